//! The downtime is measured one way and reported in parts: the host-side
//! figure (last vCPU stop on the source to first vCPU run on the
//! destination) never exceeds what the guest itself saw, and its parts add
//! up to it.

mod common;

use common::kvm_or_skip;
use common::migrations::migrate_and_verify;

/// Slack for the guest's own clock, which looks at the time every few
/// microseconds. The commit's estimated trip is covered by the report's
/// own error bar.
const AGREEMENT_MS: f64 = 0.5;

#[test]
fn host_side_downtime_agrees_with_the_guest_and_its_parts_add_up() {
    let test = "host_side_downtime_agrees_with_the_guest_and_its_parts_add_up";
    if !kvm_or_skip(test) {
        return;
    }
    for run in 1..=5 {
        let report = migrate_and_verify(
            &format!("{test}-{run}"),
            "dirty:256:1024",
            "2",
            &["--mode", "precopy", "--downtime", "10ms", "--json"],
        );
        let b = &report["blackout"];
        assert_eq!(
            b["exact"], true,
            "run {run}: the destination reports its share: {b:#}"
        );
        let host = b["host_downtime_ms"].as_f64().expect("host_downtime_ms");
        let stall = report["guest"]["stall_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("run {run}: no guest stall in {report:#}"));
        let uncertainty = b["uncertainty_ms"].as_f64().expect("uncertainty_ms");
        assert!(
            (0.0..=host).contains(&uncertainty),
            "run {run}: the error bar {uncertainty:.2} ms is at most the figure itself\n{b:#}"
        );
        assert!(
            stall >= host - uncertainty - AGREEMENT_MS,
            "run {run}: the guest saw a {stall:.2} ms stall, shorter than the host-side downtime {host:.2} ± {uncertainty:.2} ms: one of the two is wrong\n{b:#}"
        );
        let parts = b["parts"].as_array().expect("parts");
        let names: Vec<&str> = parts.iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "wake",
                "last pages",
                "state save",
                "last pages arriving",
                "state to destination",
                "commit",
                "resume"
            ],
            "run {run}"
        );
        let sum: f64 = parts.iter().filter_map(|p| p["ms"].as_f64()).sum();
        assert!(
            (sum - host).abs() <= 0.2,
            "run {run}: the parts add up to {sum:.3} ms, not {host:.3} ms\n{b:#}"
        );
        assert!(b["target_met"].is_boolean(), "run {run}: {b:#}");
        if b["target_met"] == false {
            assert!(
                b["missed_by"].is_string(),
                "run {run}: a missed target names the part that missed it\n{b:#}"
            );
        }
        eprintln!(
            "{test}: run {run}: host-side {host:.2} ms, guest {stall:.2} ms, parts: {}",
            parts
                .iter()
                .map(|p| format!(
                    "{} {:.2}",
                    p["name"].as_str().unwrap_or("?"),
                    p["ms"].as_f64().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
