//! `ferry snapshot SOCKET FILE [--stop]`: asks a running VM to write a
//! snapshot and prints what it took.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_control::{Request, Response};
use ferry_vmm::snapshot::SnapshotReport;

use crate::api;
use crate::size::show_size;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// The VM's API socket (`ferry run --api SOCKET`).
    pub socket: PathBuf,
    /// Where to write the snapshot.
    pub file: PathBuf,
    /// Stop the VM once the snapshot is safely written.
    #[arg(long)]
    pub stop: bool,
    /// Print the report as one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<bool> {
    // The VM's process may run elsewhere in the tree: send a full path, and
    // say what is wrong with it here rather than after a pause.
    let file = std::path::absolute(&args.file).context("resolving the snapshot path")?;
    let dir = file
        .parent()
        .context("the snapshot path has no directory")?;
    if !dir.is_dir() {
        bail!(
            "cannot write {}: directory {} does not exist",
            file.display(),
            dir.display()
        );
    }
    if file.is_dir() {
        bail!("cannot write {}: it is a directory", file.display());
    }
    let response = api::call(
        &args.socket,
        &Request::Snapshot {
            path: file,
            stop: args.stop,
        },
    )?;
    match response {
        Response::Snapshot(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_table(&report);
            }
            Ok(true)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the VM: {other:?}"),
    }
}

fn print_table(r: &SnapshotReport) {
    let s = &r.stats;
    let rows = [
        ("snapshot", r.path.display().to_string()),
        (
            "VM paused for",
            format!(
                "{:.1} ms ({})",
                r.pause_ms,
                if r.stopped {
                    "then stopped"
                } else {
                    "then resumed"
                }
            ),
        ),
        (
            "state record",
            format!(
                "{} bytes, saved in {:.2} ms",
                s.state_bytes, r.save_state_ms
            ),
        ),
        (
            "memory written",
            format!(
                "{} ({} pages; {} zero pages skipped)",
                show_size(s.memory_bytes),
                s.pages_written,
                s.zero_pages_skipped
            ),
        ),
        ("file size", format!("{} bytes", s.file_bytes)),
        (
            "write + fsync",
            format!("{:.1} ms + {:.1} ms", r.write_ms, r.fsync_ms),
        ),
        (
            "throughput",
            format!(
                "{:.0} MiB/s ({})",
                r.write_mib_per_s,
                if s.direct_io {
                    "direct I/O"
                } else {
                    "page cache"
                }
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<16} {v}");
    }
}
