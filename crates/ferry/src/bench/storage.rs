//! The storage rows: the same VM moved with a disk the guest writes and
//! checks, and without it, alternating in one run. `disk-shared` keeps the
//! image on storage both hosts share (the lock handed over in the
//! blackout); its target is a blackout at most 1 ms longer than without
//! the disk. `disk-local` copies the image (`--copy-storage`) and sets its
//! total, stall and bytes beside the disk-less move. QEMU's side of the
//! local row (drive-mirror to an NBD server on the destination) is not
//! built yet, and the row says so.

use std::path::Path;

use serde::Serialize;

use super::ferry_side::{run_ferry_migration, BenchDisk, FerryOutcome};
use super::{median, Row, RowResult};
use ferry_testguest::workload::Workload;

/// How the row's VM keeps its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskRow {
    Shared,
    Local,
}

/// The shared row's target: the disk adds at most this to the blackout.
pub const SHARED_EXTRA_TARGET_MS: f64 = 1.0;
/// MiB of blocks the guest writes and checks.
const DISK_MIB: u64 = 1;
/// The image: larger than what the guest writes, and sparse.
const IMAGE_MIB: u64 = 16;

/// The storage row's figures, with and without the disk, in medians.
#[derive(Debug, Serialize)]
pub struct StorageResult {
    pub kind: DiskRow,
    pub with_disk_downtime_ms: f64,
    pub without_disk_downtime_ms: f64,
    /// What the disk added to the host-side downtime.
    pub extra_downtime_ms: f64,
    pub with_disk_total_ms: f64,
    pub without_disk_total_ms: f64,
    pub with_disk_stall_ms: f64,
    pub without_disk_stall_ms: f64,
    pub with_disk_mib_sent: f64,
    pub without_disk_mib_sent: f64,
    /// Shared: whether the disk added at most [`SHARED_EXTRA_TARGET_MS`].
    pub target_kept: Option<bool>,
    /// The runs without the disk (the runs with it are the row's
    /// `ferry_runs`).
    pub without_disk_runs: Vec<FerryOutcome>,
    pub qemu: String,
}

/// Runs the row `reps` times with the disk and without, alternating.
pub fn run_row(
    result: &mut RowResult,
    kind: DiskRow,
    workload: Workload,
    reps: usize,
    dir: &Path,
    on_run: &mut dyn FnMut(&str),
) {
    let row = result.row.clone();
    let mut without = Vec::new();
    for rep in 1..=reps {
        on_run(&format!("{} ferry with the disk {rep}/{reps}", row.name));
        match with_disk(&row, kind, workload, dir) {
            Ok(o) => result.ferry_runs.push(o),
            Err(e) => result.ferry_errors.push(format!("{e:#}")),
        }
        on_run(&format!("{} ferry without the disk {rep}/{reps}", row.name));
        match run_ferry_migration(&row.ferry_migration(workload, None), dir) {
            Ok(o) => without.push(o),
            Err(e) => result.ferry_errors.push(format!("without the disk: {e:#}")),
        }
    }
    let med =
        |runs: &[FerryOutcome], f: fn(&FerryOutcome) -> f64| median(runs.iter().map(f).collect());
    let with = &result.ferry_runs;
    if with.is_empty() || without.is_empty() {
        return;
    }
    let downtime = |o: &FerryOutcome| o.host_downtime_ms;
    let extra = med(with, downtime) - med(&without, downtime);
    result.storage = Some(StorageResult {
        kind,
        with_disk_downtime_ms: med(with, downtime),
        without_disk_downtime_ms: med(&without, downtime),
        extra_downtime_ms: extra,
        with_disk_total_ms: med(with, |o| o.total_ms),
        without_disk_total_ms: med(&without, |o| o.total_ms),
        with_disk_stall_ms: med(with, |o| o.guest_stall_ms),
        without_disk_stall_ms: med(&without, |o| o.guest_stall_ms),
        with_disk_mib_sent: med(with, |o| o.transferred_bytes as f64 / (1 << 20) as f64),
        without_disk_mib_sent: med(&without, |o| o.transferred_bytes as f64 / (1 << 20) as f64),
        target_kept: (kind == DiskRow::Shared).then_some(extra <= SHARED_EXTRA_TARGET_MS),
        without_disk_runs: without,
        qemu: match kind {
            DiskRow::Shared => {
                "QEMU not run: the row sets Ferry with a disk beside Ferry without".into()
            }
            DiskRow::Local => {
                "QEMU's drive-mirror to an NBD server is not built into the bench yet".into()
            }
        },
    });
}

/// One move with the disk, on a fresh sparse image (and, for the copy, a
/// destination image that does not exist yet); both are removed after.
fn with_disk(
    row: &Row,
    kind: DiskRow,
    workload: Workload,
    dir: &Path,
) -> anyhow::Result<FerryOutcome> {
    let image = dir.join(format!("bench-disk-{}.img", std::process::id()));
    let copy = dir.join(format!("bench-disk-{}-on-b.img", std::process::id()));
    let _ = std::fs::remove_file(&copy);
    std::fs::File::create(&image)?.set_len(IMAGE_MIB << 20)?;
    let disk = BenchDisk {
        image: image.clone(),
        copy_to: (kind == DiskRow::Local).then(|| copy.clone()),
        mib: DISK_MIB,
    };
    let outcome = run_ferry_migration(&row.ferry_migration(workload, Some(disk)), dir);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&copy);
    outcome
}

/// The storage row's figures for people, and its target kept or MISSED.
pub fn print(name: &str, s: &StorageResult) {
    let ms = |v: f64| format!("{v:.2}");
    println!(
        "\n{name}: the same VM with its disk ({:?}) and without, medians",
        s.kind
    );
    println!("| | with the disk | without | difference |");
    println!("|---|---|---|---|");
    let rows = [
        (
            "host-side downtime ms",
            s.with_disk_downtime_ms,
            s.without_disk_downtime_ms,
        ),
        ("total ms", s.with_disk_total_ms, s.without_disk_total_ms),
        (
            "guest-seen stall ms",
            s.with_disk_stall_ms,
            s.without_disk_stall_ms,
        ),
        ("MiB sent", s.with_disk_mib_sent, s.without_disk_mib_sent),
    ];
    for (what, with, without) in rows {
        println!(
            "| {what} | {} | {} | {} |",
            ms(with),
            ms(without),
            ms(with - without)
        );
    }
    match s.target_kept {
        Some(kept) => println!(
            "target: the disk adds at most {SHARED_EXTRA_TARGET_MS} ms to the blackout: {} ({:+.2} ms)",
            if kept { "kept" } else { "MISSED" },
            s.extra_downtime_ms
        ),
        None => println!("{}", s.qemu),
    }
}
