//! Whole migrations as the tests drive them: `ferry migrate` to its end,
//! the source handing over, the destination verifying and reporting.

use std::time::Duration;

use ferry_testguest::console::Heartbeat;
use serde_json::Value;

use super::{
    migration_destination_with_api, migration_source, start_migrate, verify_arrival,
    verify_still_running, FerryProc, Stream, TempDir,
};

/// Waits for `ferry migrate` to end; returns its exit status and its JSON
/// report (if it printed one).
pub fn finish_migrate(mig: &mut FerryProc, timeout: Duration) -> (std::process::ExitStatus, Value) {
    let status = mig.wait_exit(timeout);
    let report = if mig.out.iter().any(|l| l == "{") {
        mig.json_report()
    } else {
        Value::Null
    };
    (status, report)
}

/// The source after a committed migration: it exits 0 by itself, says the
/// VM was migrated and stopped there, printed no bad page; returns the last
/// heartbeat it printed.
pub fn source_handed_over(src: &mut FerryProc, port: u16) -> Heartbeat {
    let status = src.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the source must exit 0 after a committed migration: {status}\n{}",
        src.transcript()
    );
    let said = format!("ferry: VM migrated to 127.0.0.1:{port}");
    assert!(
        src.err
            .iter()
            .any(|l| l.starts_with(&said) && l.ends_with("stopped here")),
        "the source must say `{said} ...; stopped here`\n{}",
        src.transcript()
    );
    let errs = src.page_errors();
    assert!(errs.is_empty(), "ERR lines on the source: {errs:?}");
    let hbs = src.heartbeats();
    let last = hbs.last().cloned().expect("the source printed heartbeats");
    assert_eq!(last.err, 0, "errors on the source: {last:?}");
    last
}

/// Asserts a committed `--json` report and returns it.
pub fn assert_committed(status: std::process::ExitStatus, report: &Value, mig: &FerryProc) {
    assert!(
        status.success(),
        "ferry migrate must exit 0: {status}\n{}",
        mig.transcript()
    );
    assert_eq!(
        report["outcome"],
        "committed",
        "report: {report:#}\n{}",
        mig.transcript()
    );
}

/// Prints the rounds of a report for the log.
pub fn log_rounds(test: &str, report: &Value) {
    eprintln!(
        "{test}: total {:.1} ms, setup {:.1} ms, {} bytes, max throttle {}%, host downtime {:.2} ms, guest stall {} ms, first seq {}",
        report["total_ms"].as_f64().unwrap_or(f64::NAN),
        report["setup_ms"].as_f64().unwrap_or(f64::NAN),
        report["bytes_sent"],
        report["max_throttle_percent"],
        report["blackout"]["host_downtime_ms"].as_f64().unwrap_or(f64::NAN),
        report["guest"]["stall_ms"],
        report["guest"]["first_seq"],
    );
    for r in report["rounds"].as_array().into_iter().flatten() {
        eprintln!(
            "{test}:   round {:>2}: {:>7} pages, {:>9.1} ms, {:>6.0} MiB/s, dirty {:>6.0} MiB/s, throttle {:>2}%{}",
            r["round"],
            r["pages"],
            r["duration_ms"].as_f64().unwrap_or(f64::NAN),
            r["throughput_mibs"].as_f64().unwrap_or(f64::NAN),
            r["dirty_rate_mibs"].as_f64().unwrap_or(f64::NAN),
            r["throttle_percent"],
            if r["blackout"] == true { " (blackout)" } else { "" }
        );
    }
}

/// Stops a destination that verified its guest, and checks its own report.
pub fn stop_destination(dst: &mut FerryProc) {
    let status = dst.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the destination's verdict must be ok: {status}\n{}",
        dst.transcript()
    );
    let report = dst.json_report();
    assert_eq!(report["verdict"], "ok", "{report:#}");
    assert_eq!(report["guest"]["errors"], 0, "{report:#}");
    assert_eq!(report["guest"]["sequence_breaks"], 0, "{report:#}");
    assert!(report["received"].is_object(), "{report:#}");
}

/// One whole migration of a fresh 1 GiB VM running `workload` on two vCPUs,
/// with `migrate_args`; returns the migration report after verifying the
/// guest on the destination.
pub fn migrate_and_verify(test: &str, workload: &str, vcpus: &str, migrate_args: &[&str]) -> Value {
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "1G", vcpus, workload);
    let (mut dst, port, _dst_socket) = migration_destination_with_api(&dir, "destination");
    // Let the guest run a little before it moves.
    src.next_heartbeat(Duration::from_secs(10));
    let mut mig = start_migrate("migrate", &socket, port, migrate_args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(90));
    assert_committed(status, &report, &mig);
    log_rounds(test, &report);
    let last = source_handed_over(&mut src, port);
    let (first, _) = verify_arrival(&mut dst, &last, Duration::from_secs(30));
    assert_eq!(
        report["guest"]["first_seq"].as_u64(),
        Some(first.seq),
        "the report's first_seq must be the destination's first heartbeat"
    );
    stop_destination(&mut dst);
    report
}

/// `ferry migrate` must fail (exit 1) and say why on stderr; returns the
/// reason it gave.
pub fn migrate_failed(mig: &mut FerryProc, timeout: Duration) -> String {
    let status = mig.wait_exit(timeout);
    assert_eq!(
        status.code(),
        Some(1),
        "ferry migrate must fail with exit 1\n{}",
        mig.transcript()
    );
    let line = mig
        .err
        .iter()
        .find_map(|l| l.strip_prefix("ferry: migration failed: "))
        .unwrap_or_else(|| {
            panic!(
                "no `ferry: migration failed: REASON` line\n{}",
                mig.transcript()
            )
        })
        .to_owned();
    assert!(
        line.ends_with("; the VM is running on the source"),
        "the VM must be running on the source: {line}"
    );
    if mig.out.iter().any(|l| l == "{") {
        let report = mig.json_report();
        assert_eq!(report["outcome"], "aborted: VM running on the source");
    }
    line
}

/// The source printed that the migration failed and that the VM runs
/// there; waits for that line, then checks that the guest runs on and
/// verifies a whole sweep after it.
pub fn source_runs_on_after_failure(src: &mut FerryProc, port: u16) -> Vec<Heartbeat> {
    let to = format!("ferry: migration to 127.0.0.1:{port} failed: ");
    src.wait_line(
        Duration::from_secs(10),
        "the source's failure line",
        |s, text| {
            (s == Stream::Err && text.starts_with(&to))
                .then(|| assert!(text.ends_with("; the VM runs here"), "{text}"))
        },
    );
    let after = verify_still_running(src, Duration::from_secs(30));
    assert!(
        src.child.try_wait().expect("try_wait").is_none(),
        "the source process must still run"
    );
    after
}

/// The destination holds no VM: it exited non-zero (or was killed) and
/// never printed a heartbeat.
pub fn destination_holds_nothing(dst: &mut FerryProc, killed: bool) {
    let status = if killed {
        dst.kill()
    } else {
        dst.wait_exit(Duration::from_secs(40))
    };
    assert!(
        !status.success(),
        "the destination must not succeed: {status}\n{}",
        dst.transcript()
    );
    if !killed {
        assert_eq!(status.code(), Some(1), "{}", dst.transcript());
        assert!(
            dst.err
                .iter()
                .any(|l| l.starts_with("ferry: incoming migration from ")
                    && l.ends_with("; no VM runs here")),
            "the destination must say that no VM runs there\n{}",
            dst.transcript()
        );
    }
    let hbs = dst.heartbeats();
    assert!(
        hbs.is_empty(),
        "the destination ran the guest: {hbs:?}\n{}",
        dst.transcript()
    );
    assert!(
        !dst.err.iter().any(|l| l.starts_with("ferry: VM received")),
        "the destination says it received the VM\n{}",
        dst.transcript()
    );
}
