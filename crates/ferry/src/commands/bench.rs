//! `ferry bench`: see [`crate::bench`].

use anyhow::bail;

use crate::bench::{rows, run_rows, table};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Migrations per row and engine; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Only these rows (idle, dirty-100, dirty-1024-10ms, fill-768-prealloc,
    /// fill-768-prealloc-4streams,
    /// postcopy-max-300MiBs, hybrid-max-300MiBs, auto-max-300MiBs).
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Skip QEMU (no ratios): for a machine without qemu-system-x86.
    #[arg(long)]
    pub no_qemu: bool,
    /// Print the results as one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<bool> {
    let all = rows();
    for name in &args.rows {
        if !all.iter().any(|r| r.name == name) {
            let names: Vec<_> = all.iter().map(|r| r.name).collect();
            bail!("--rows: unknown row {name:?} (rows: {})", names.join(", "));
        }
    }
    let chosen: Vec<_> = all
        .into_iter()
        .filter(|r| args.rows.is_empty() || args.rows.iter().any(|n| n == r.name))
        .collect();
    let reps = args.reps as usize;
    let results = run_rows(&chosen, reps, !args.no_qemu, &mut |what| {
        eprintln!("ferry bench: {what}")
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        table::print(&results, reps);
    }
    let all_verified = results.iter().all(|r| {
        r.ferry_errors.is_empty()
            && r.qemu_errors.is_empty()
            && r.ferry_runs.iter().all(|o| o.verified)
            && r.qemu_runs.iter().all(|o| o.verified)
    });
    Ok(all_verified)
}
