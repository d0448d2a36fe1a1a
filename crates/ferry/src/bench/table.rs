//! The bench table for people.

use super::network::{NetRun, NetworkResult, GAP_OVER_STALL_MS};
use super::{BenchResults, RowResult};

pub fn print(all: &BenchResults, reps: usize) {
    let results = &all.rows[..];
    match (&all.loopback, &all.loopback_error) {
        (Some(l), _) => println!(
            "\niperf3, loopback TCP in this run: {:.1} Gbit/s on 1 stream, {:.1} Gbit/s on 4",
            l.one_stream_gbit, l.four_streams_gbit
        ),
        (None, Some(e)) => println!("\niperf3 FAILED: {e}"),
        (None, None) => {}
    }
    let f1 = |v: Option<f64>| {
        v.filter(|x| x.is_finite())
            .map_or("-".into(), |x| format!("{x:.1}"))
    };
    let ratio = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
    println!(
        "\nMedians of {reps} runs each; 1 GiB, microvm for QEMU (its guest runs on one vCPU); ratio = Ferry/QEMU (below 1: Ferry better); target kept = runs whose downtime kept the target, host-side / guest-seen; the network row migrates between two hosts' namespaces, the others over loopback.\n"
    );
    println!(
        "| row | vCPUs | workload | mode (ferry / qemu) | cap | prealloc | downtime target | ferry total ms | qemu total ms | ratio | ferry guest stall ms | qemu guest stall ms | ratio | ferry MiB sent | qemu MiB sent | ratio | ferry Gbit/s | qemu Gbit/s | of iperf3 ferry / qemu | target kept ferry | target kept qemu | verified ferry / qemu |"
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in results {
        let f = r.ferry.as_ref();
        let q = r.qemu.as_ref();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            r.row.name,
            r.row.vcpus,
            if r.row.network {
                format!("{}+net", r.row.workload)
            } else if r.row.disk.is_some() {
                format!("{}+disk", r.row.workload)
            } else {
                r.row.workload.clone()
            },
            format_args!(
                "{} / {}",
                r.row.mode,
                if r.row.mode == ferry_migration::mode::Mode::Precopy {
                    "precopy"
                } else {
                    "postcopy"
                }
            ),
            r.row
                .bandwidth
                .map_or("none".into(), |b| format!("{} MiB/s", b >> 20)),
            if r.row.prealloc { "both" } else { "no" },
            r.row
                .downtime_ms
                .map_or("defaults (20 / 300 ms)".into(), |d| format!("{d} ms")),
            f1(f.map(|m| m.total_ms)),
            f1(q.map(|m| m.total_ms)),
            ratio(r.ratio_total),
            f1(f.map(|m| m.guest_stall_ms)),
            f1(q.map(|m| m.guest_stall_ms)),
            ratio(r.ratio_stall),
            f1(f.map(|m| m.transferred_mib)),
            f1(q.map(|m| m.transferred_mib)),
            ratio(r.ratio_bytes),
            f1(f.map(|m| m.throughput_gbit)),
            f1(q.map(|m| m.throughput_gbit)),
            format_args!("{} / {}", percent(r.ferry_of_loopback), percent(r.qemu_of_loopback)),
            r.ferry_target.as_ref().map_or("-".into(), |t| t.show()),
            r.qemu_target.as_ref().map_or("-".into(), |t| t.show()),
            f.map_or("-".into(), |m| m.verified.clone()),
            q.map_or("-".into(), |m| m.verified.clone()),
        );
    }
    super::tls_cost::print(&all.tls_costs);
    print_postcopy(results);
    for r in results {
        if let Some(n) = &r.network {
            print_network(r.row.name, n);
        }
        if let Some(st) = &r.storage {
            super::storage::print(r.row.name, st);
        }
    }
    for r in results {
        for e in &r.ferry_errors {
            println!("ferry {} failed: {e}", r.row.name);
        }
        for e in &r.qemu_errors {
            println!("qemu {} failed: {e}", r.row.name);
        }
        for run in r.ferry_runs.iter().filter(|o| !o.verified) {
            println!(
                "ferry {} NOT VERIFIED: {}",
                r.row.name,
                run.verify_failures.join("; ")
            );
        }
        for run in r.qemu_runs.iter().filter(|o| !o.verified) {
            println!(
                "qemu {} NOT VERIFIED: {}",
                r.row.name,
                run.verify_failures.join("; ")
            );
        }
    }
}

fn percent(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{:.0}%", x * 100.0))
}

/// The post-copy phase of the rows that have one: Ferry's remote fault
/// latency and pages fetched, beside whether QEMU really went post-copy.
fn print_postcopy(results: &[RowResult]) {
    let rows: Vec<&RowResult> = results
        .iter()
        .filter(|r| r.row.mode != ferry_migration::mode::Mode::Precopy)
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\n| row | ferry runs in post-copy | ferry fault p50 / p99 / max us (median of runs) | ferry pages on demand / pushed | ferry last page ms | qemu runs in post-copy |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let pcs: Vec<_> = r
            .ferry_runs
            .iter()
            .filter_map(|o| o.report.postcopy.as_ref())
            .collect();
        let med = |f: &dyn Fn(&ferry_migration::stats::PostcopyReport) -> f64| {
            super::median(pcs.iter().map(|p| f(p)).collect())
        };
        println!(
            "| {} | {}/{} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {}/{} |",
            r.row.name,
            pcs.len(),
            r.ferry_runs.len(),
            med(&|p| p.fault_p50_us as f64),
            med(&|p| p.fault_p99_us as f64),
            med(&|p| p.fault_max_us as f64),
            med(&|p| p.requested_pages as f64),
            med(&|p| p.pushed_pages as f64),
            med(&|p| p.last_page_ms),
            r.qemu_runs.iter().filter(|q| q.postcopy_started).count(),
            r.qemu_runs.len(),
        );
    }
}

/// The network row's client figures, run by run and in medians, and the
/// issue's targets, each kept or MISSED.
fn print_network(name: &str, n: &NetworkResult) {
    println!(
        "\nNetwork row `{name}`: a client in its own namespace sends one TCP request and one UDP probe every 1 ms over one connection while the VM migrates from host A to host B (pre-copy, each engine's defaults; QEMU announces with its defaults).\n"
    );
    if let Some(why) = &n.skipped {
        println!("| row | result |\n|---|---|\n| {name} | **SKIPPED**: {why} |");
        println!("\nSKIPPED: the network row did not run: {why}");
        print_targets(n);
        return;
    }
    println!(
        "| engine | run | TCP connection | TCP resets | TCP requests lost | longest TCP gap ms | guest stall ms | gap - stall ms | TCP retransmissions | UDP probes lost / sent | longest UDP gap ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let f1 = |v: Option<f64>| {
        v.filter(|x| x.is_finite())
            .map_or("-".into(), |x| format!("{x:.1}"))
    };
    let line = |engine: &str, run: &NetRun| {
        println!(
            "| {engine} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            run.rep,
            if run.connection_kept {
                "kept"
            } else {
                "NOT kept"
            },
            run.tcp_resets,
            run.tcp_requests_lost,
            f1(run.tcp_longest_gap_ms),
            f1(Some(run.guest_stall_ms)),
            f1(run.tcp_longest_gap_ms.map(|g| g - run.guest_stall_ms)),
            run.tcp_retransmissions,
            run.udp_probes_lost,
            run.udp_probes_sent,
            f1(run.udp_longest_gap_ms),
        )
    };
    for run in &n.ferry_runs {
        line("ferry", run);
    }
    for run in &n.qemu_runs {
        line("qemu", run);
    }
    if let Some(why) = &n.qemu_skipped {
        println!("| qemu | - | **SKIPPED**: {why} | | | | | | | | |");
    }
    let ratio = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
    let med = |s: &Option<super::network::NetSummary>,
               f: fn(&super::network::NetSummary) -> f64| { f1(s.as_ref().map(f)) };
    println!(
        "\nMedians: longest TCP gap ferry {} ms / qemu {} ms (ratio {}); longest UDP gap ferry {} ms / qemu {} ms (ratio {}); guest stall ferry {} ms / qemu {} ms.",
        med(&n.ferry, |s| s.tcp_longest_gap_ms),
        med(&n.qemu, |s| s.tcp_longest_gap_ms),
        ratio(n.ratio_tcp_gap),
        med(&n.ferry, |s| s.udp_longest_gap_ms),
        med(&n.qemu, |s| s.udp_longest_gap_ms),
        ratio(n.ratio_udp_gap),
        med(&n.ferry, |s| s.guest_stall_ms),
        med(&n.qemu, |s| s.guest_stall_ms),
    );
    print_targets(n);
}

/// The targets, each kept, MISSED or NOT MEASURED.
fn print_targets(n: &NetworkResult) {
    println!("\n| target (issue 15; gap allowance {GAP_OVER_STALL_MS} ms) | measured | verdict |");
    println!("|---|---|---|");
    for t in &n.targets {
        println!("| {} | {} | {} |", t.target, t.measured, t.verdict());
    }
}
