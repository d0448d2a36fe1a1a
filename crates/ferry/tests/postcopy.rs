//! Post-copy and hybrid migrations between separate processes, with real
//! userfaultfd on the destination and real TCP: the guest verifies every
//! page of its working set after the move, as in every migration test.

mod common;

use std::time::Duration;

use common::migrations::migrate_and_verify;
use common::{
    kvm_or_skip, migration_destination_with_api, migration_source, start_migrate, TempDir,
};
use serde_json::Value;

fn postcopy_figures(test: &str, report: &Value) -> Value {
    let pc = report["postcopy"].clone();
    assert!(pc.is_object(), "no post-copy in the report: {report:#}");
    eprintln!(
        "{test}: total {:.1} ms, guest stall {} ms, {} pages missing at the switch ({} pushed, {} on demand), faults {}, latency p50 {} us p99 {} us max {} us, last page at {:.1} ms",
        report["total_ms"].as_f64().unwrap_or(f64::NAN),
        report["guest"]["stall_ms"],
        pc["needed_pages"],
        pc["pushed_pages"],
        pc["requested_pages"],
        pc["faults"],
        pc["fault_p50_us"],
        pc["fault_p99_us"],
        pc["fault_max_us"],
        pc["last_page_ms"].as_f64().unwrap_or(f64::NAN),
    );
    let needed = pc["needed_pages"].as_u64().unwrap();
    let sent = pc["pushed_pages"].as_u64().unwrap() + pc["requested_pages"].as_u64().unwrap();
    assert!(needed > 0, "{pc:#}");
    assert!(sent >= needed, "every missing page must be sent: {pc:#}");
    pc
}

#[test]
fn postcopy_two_vcpus_unthrottled_writer_arrives_verified() {
    let test = "postcopy_two_vcpus_unthrottled_writer_arrives_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let report = migrate_and_verify(
        test,
        "dirty:256:max",
        "2",
        &["--mode", "postcopy", "--json"],
    );
    assert_eq!(report["mode"], "postcopy");
    assert!(
        report["rounds"].as_array().is_some_and(Vec::is_empty),
        "post-copy sends no pre-copy round: {report:#}"
    );
    let pc = postcopy_figures(test, &report);
    // The writer touches its whole working set at once: it must fault.
    assert!(pc["requested_pages"].as_u64().unwrap() > 0, "{pc:#}");
}

#[test]
fn hybrid_under_a_cap_the_writer_outruns_completes_verified() {
    let test = "hybrid_under_a_cap_the_writer_outruns_completes_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let report = migrate_and_verify(
        test,
        "dirty:256:max",
        "1",
        &["--mode", "hybrid", "--bandwidth", "100MiB/s", "--json"],
    );
    assert_eq!(report["mode"], "hybrid");
    let rounds = report["rounds"].as_array().expect("rounds");
    assert!(
        !rounds.is_empty(),
        "hybrid starts with pre-copy: {report:#}"
    );
    assert_eq!(report["max_throttle_percent"], 0, "hybrid never brakes");
    let pc = postcopy_figures(test, &report);
    let reason = pc["reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{pc:#}");
}

#[test]
fn source_killed_mid_postcopy_leaves_the_vm_lost_not_running() {
    let test = "source_killed_mid_postcopy_leaves_the_vm_lost_not_running";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "1", "dirty:256:max");
    let (mut dst, port, _) = migration_destination_with_api(&dir, "destination");
    src.next_heartbeat(Duration::from_secs(10));
    // A slow push keeps post-copy going for seconds.
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--mode", "postcopy", "--bandwidth", "40MiB/s", "--json"],
    );
    dst.wait_line(Duration::from_secs(30), "the post-copy start", |_, text| {
        text.contains("post-copy: the VM runs here without")
            .then_some(())
    });
    src.kill();
    let reason = dst.wait_line(Duration::from_secs(30), "the loss", |_, text| {
        text.contains("post-copy FAILED").then(|| text.to_string())
    });
    assert!(reason.contains("LOST"), "{reason}");
    let status = dst.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a destination that lost its VM must not exit 0\n{}",
        dst.transcript()
    );
    let report = dst.json_report();
    assert_eq!(report["ended_by"], "MemoryLost", "{report:#}");
    assert_eq!(report["verdict"], "FAILED", "{report:#}");
    assert!(
        !dst.err.iter().any(|l| l.contains("post-copy complete")),
        "{}",
        dst.transcript()
    );
    // The guest never read a wrong page while it ran here.
    assert!(dst.page_errors().is_empty(), "{}", dst.transcript());
    assert!(dst.heartbeats().iter().all(|h| h.err == 0));
    let mig_status = mig.wait_exit(Duration::from_secs(30));
    assert!(!mig_status.success(), "{}", mig.transcript());
}

#[test]
fn auto_picks_precopy_for_a_light_writer_and_postcopy_for_an_outrunning_one() {
    let test = "auto_picks_precopy_for_a_light_writer_and_postcopy_for_an_outrunning_one";
    if !kvm_or_skip(test) {
        return;
    }
    for (name, workload, args, chosen) in [
        ("auto_light", "dirty:64:10", &["--json"][..], "precopy"),
        (
            "auto_max",
            "dirty:256:max",
            &["--bandwidth", "100MiB/s", "--json"][..],
            "postcopy",
        ),
    ] {
        // No --mode: auto is the default.
        // A short name: the API socket's path must fit in sun_path.
        let report = migrate_and_verify(name, workload, "1", args);
        let p = &report["prediction"];
        eprintln!("{test}: {workload}: {p:#}");
        assert_eq!(report["mode"], format!("auto: {chosen}"), "{report:#}");
        assert_eq!(p["chosen"], chosen, "{p:#}");
        assert_eq!(p["modes"].as_array().map(Vec::len), Some(3), "{p:#}");
        assert!(p["why"].as_str().is_some_and(|w| !w.is_empty()));
        assert_eq!(report["postcopy"].is_object(), chosen == "postcopy");
    }
}
