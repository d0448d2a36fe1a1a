//! `ferry bench`: see [`crate::bench`].

use anyhow::bail;

use crate::bench::{rows, run_rows, table};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Migrations per row and engine; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Only these rows (iperf3, idle, dirty-100, dirty-1024-10ms,
    /// dirty-1024-10ms-2vcpu, fill-768-prealloc, fill-768-prealloc-4streams,
    /// fill-768-prealloc-tls, fill-768-prealloc-tls-4streams,
    /// postcopy-max-300MiBs, hybrid-max-300MiBs, auto-max-300MiBs, network,
    /// disk-shared, disk-local). iperf3, the loopback TCP limit, runs
    /// whenever a throughput row does. The disk rows move the same VM with
    /// its disk and without; disk-local also runs QEMU with the disk (a
    /// mirror to an NBD export on its destination), disk-shared is Ferry
    /// alone.
    /// network needs root (it builds namespaces, bridges and taps) and says
    /// SKIPPED without it.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Skip QEMU (no ratios): for a machine without qemu-system-x86.
    #[arg(long)]
    pub no_qemu: bool,
    /// Print the results as one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// The name of the loopback-limit row.
const IPERF_ROW: &str = "iperf3";

pub fn bench(args: BenchArgs) -> anyhow::Result<bool> {
    let all = rows();
    for name in &args.rows {
        if name != IPERF_ROW && !all.iter().any(|r| r.name == name) {
            let names: Vec<_> = all.iter().map(|r| r.name).collect();
            bail!(
                "--rows: unknown row {name:?} (rows: {IPERF_ROW}, {})",
                names.join(", ")
            );
        }
    }
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|r| args.rows.is_empty() || args.rows.iter().any(|n| n == r.name))
        .collect();
    let reps = args.reps as usize;
    let with_iperf = args.rows.is_empty()
        || args.rows.iter().any(|n| n == IPERF_ROW)
        || chosen.iter().any(|r| r.is_throughput_row());
    let results = run_rows(&chosen, reps, !args.no_qemu, with_iperf, &mut |what| {
        eprintln!("ferry bench: {what}")
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        table::print(&results, reps);
    }
    let all_verified = results.loopback_error.is_none()
        && results.rows.iter().all(|r| {
            r.ferry_errors.is_empty()
                && r.qemu_errors.is_empty()
                && r.ferry_runs.iter().all(|o| o.verified)
                && r.qemu_runs.iter().all(|o| o.verified)
        });
    Ok(all_verified)
}
