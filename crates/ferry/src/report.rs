//! A migration report for people: one table, then one row per round.

use ferry_migration::stats::MigrationReport;

use crate::size::show_size;

pub fn print_migration_report(r: &MigrationReport) {
    let ms = |v: f64| format!("{v:.1} ms");
    let stall = r
        .guest
        .stall_ms
        .map_or("- (destination did not report)".into(), |v| {
            format!("{v:.2} ms")
        });
    let mut rows = vec![
        ("outcome", r.outcome.clone()),
        (
            "VM",
            format!("{} vCPU, {}", r.vcpus, show_size(r.mem_bytes)),
        ),
        ("destination", r.destination.clone()),
        ("transport", r.transport.clone()),
        (
            "mode / downtime target",
            format!("{} / {:.1} ms", r.mode, r.downtime_target_ms),
        ),
        (
            "bandwidth cap",
            r.bandwidth_limit
                .map_or("none".into(), |b| format!("{:.0} MiB/s", b as f64 / (1 << 20) as f64)),
        ),
        ("setup", ms(r.setup_ms)),
        ("total", ms(r.total_ms)),
        (
            "host-side downtime",
            format!(
                "{:.2} ms{} (predicted {:.2} ms{}){}",
                r.blackout.host_downtime_ms,
                if !r.blackout.exact {
                    " at most".to_string()
                } else if r.blackout.uncertainty_ms >= 0.005 {
                    format!(" ± {:.2}", r.blackout.uncertainty_ms)
                } else {
                    String::new()
                },
                r.blackout.predicted_ms,
                if r.blackout.forced { ", FORCED" } else { "" },
                match (r.blackout.target_met, &r.blackout.missed_by) {
                    (Some(true), _) => format!(": target {:.1} ms met", r.downtime_target_ms),
                    (Some(false), Some(by)) => format!(
                        ": target {:.1} ms MISSED, by {by}",
                        r.downtime_target_ms
                    ),
                    (Some(false), None) => {
                        format!(": target {:.1} ms MISSED", r.downtime_target_ms)
                    }
                    (None, _) => String::new(),
                }
            ),
        ),
        ("stall the guest measured", stall),
        ("blackout parts", r.blackout.parts_line()),
        (
            "around the blackout",
            format!(
                "stopping the vCPUs took {:.2} ms before it; last {} pages, state {} B; blackout thread at {}",
                r.blackout.stop_vcpus_ms,
                r.blackout.final_pages,
                r.blackout.state_bytes,
                r.blackout.priority
            ),
        ),
        (
            "sent",
            format!(
                "{:.1} MiB, {} pages ({} zero, no payload)",
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.pages_sent,
                r.zero_pages
            ),
        ),
        ("throughput", format!("{:.0} MiB/s ({:.1} Gbit/s)", r.throughput_mibs, r.throughput_mibs * 8.0 * 1.048576 / 1e3)),
        ("max throttle", format!("{}%", r.max_throttle_percent)),
    ];
    if let Some(why) = &r.blackout.commit_recovered {
        rows.push(("commit recovered", why.clone()));
    }
    if let Some(p) = &r.prediction {
        let chosen = p.modes.iter().find(|m| m.mode == p.chosen);
        rows.extend([
            (
                "auto measured",
                format!(
                    "dirty {:.0} MiB/s over {:.0} ms, link {:.0} MiB/s ({}), {:.0} MiB may hold data",
                    p.dirty_rate_mibs,
                    p.sample_ms,
                    p.link_rate_mibs,
                    if p.link_rate_measured { "measured" } else { "cap or assumed" },
                    p.populated_mib
                ),
            ),
            ("auto chose", format!("{}: {}", p.chosen, p.why)),
            (
                "predicted / happened",
                chosen.map_or("-".into(), |m| {
                    format!(
                        "total {:.0} / {:.0} ms, host downtime {:.1} / {:.1} ms",
                        m.total_ms, r.total_ms, m.blackout_ms, r.blackout.host_downtime_ms
                    )
                }),
            ),
        ]);
    }
    if let Some(p) = &r.postcopy {
        rows.extend([
            ("post-copy because", p.reason.clone()),
            (
                "post-copy pages",
                format!(
                    "{} missing at the switch: {} pushed, {} fetched on demand",
                    p.needed_pages, p.pushed_pages, p.requested_pages
                ),
            ),
            (
                "remote fault latency",
                format!(
                    "p50 {} us, p99 {} us, max {} us ({} faults)",
                    p.fault_p50_us, p.fault_p99_us, p.fault_max_us, p.faults
                ),
            ),
            (
                "last page arrived",
                format!(
                    "{:.1} ms after the VM started on the destination (post-copy phase {:.1} ms)",
                    p.last_page_ms, p.duration_ms
                ),
            ),
        ]);
    }
    if let Some(n) = &r.network {
        rows.push((
            "network handover",
            format!(
                "{} frames held since the pause, {} strays after the commit, {} dropped; forwarded over {:.1} ms{}",
                n.held,
                n.strays,
                n.dropped,
                n.window_ms,
                n.error
                    .as_ref()
                    .map(|e| format!(" (stopped: {e})"))
                    .unwrap_or_default()
            ),
        ));
    }
    if let Some(d) = &r.disk_copy {
        rows.push((
            "disk copied",
            format!(
                "{} ({} MiB): {} blocks of 4 KiB sent, {} in the first pass, {} in the blackout; {} rounds found guest writes to resend",
                d.image,
                d.image_bytes >> 20,
                d.blocks_sent,
                d.first_pass_blocks,
                d.blackout_blocks,
                d.rounds_with_writes
            ),
        ));
        if d.writes_held > 0 || d.write_blocking_ms > 0.0 {
            rows.push((
                "write-blocking",
                format!(
                    "{:.1} ms: {} guest writes waited for the copy, the longest {:.1} ms{}",
                    d.write_blocking_ms,
                    d.writes_held,
                    d.longest_hold_ms,
                    if d.writes_released_unsent > 0 {
                        format!(
                            "; {} let through unsent after {} s (sent later)",
                            d.writes_released_unsent,
                            ferry_vmm::devices::block::copy_hold::LONGEST_HOLD.as_secs()
                        )
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
    if !r.rounds.is_empty() {
        rows.push((
            "CPU",
            "the source's migration threads, percent of one core per round (a throttle floor is the share the brake guarantees them)".into(),
        ));
    }
    println!();
    for (k, v) in rows {
        println!("  {k:<26} {v}");
    }
    if r.rounds.is_empty() {
        return;
    }
    println!();
    println!(
        "  {:>5} {:>9} {:>9} {:>10} {:>9} {:>10} {:>11} {:>8} {:>8}",
        "round", "pages", "zero", "MiB sent", "ms", "MiB/s", "dirty MiB/s", "throttle", "CPU"
    );
    for round in &r.rounds {
        println!(
            "  {:>5} {:>9} {:>9} {:>10.1} {:>9.1} {:>10.0} {:>11.0} {:>7}% {:>7.0}%{}",
            round.round,
            round.pages,
            round.zero_pages,
            round.bytes_sent as f64 / (1 << 20) as f64,
            round.duration_ms,
            round.throughput_mibs,
            round.dirty_rate_mibs,
            round.throttle_percent,
            round.cpu_percent,
            if round.blackout { "  (blackout)" } else { "" }
        );
    }
}
