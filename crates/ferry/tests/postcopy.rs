//! Post-copy and hybrid migrations between separate processes, with real
//! userfaultfd on the destination and real TCP: the guest verifies every
//! page of its working set after the move, as in every migration test.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::migrations::{
    assert_committed, finish_migrate, migrate_and_verify, source_handed_over,
};
use common::{
    kvm_or_skip, migration_destination, migration_source, start_migrate, FerryProc, TempDir,
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
    let (mut dst, port) = migration_destination(
        "destination",
        &["--duration", "300s", "--json", "--recovery-timeout", "2s"],
    );
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
fn auto_picks_precopy_for_a_light_writer_and_postcopy_for_an_outrunning_one_only_if_allowed() {
    let test =
        "auto_picks_precopy_for_a_light_writer_and_postcopy_for_an_outrunning_one_only_if_allowed";
    if !kvm_or_skip(test) {
        return;
    }
    for (name, workload, args, chosen) in [
        (
            "auto_light",
            "dirty:64:10",
            &["--allow-postcopy", "--json"][..],
            "precopy",
        ),
        (
            "auto_max",
            "dirty:256:max",
            &["--bandwidth", "100MiB/s", "--allow-postcopy", "--json"][..],
            "postcopy",
        ),
        // The same writer without the VM's permission: pre-copy, braked.
        (
            "auto_safe",
            "dirty:256:max",
            &["--bandwidth", "100MiB/s", "--json"][..],
            "precopy",
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
        if name == "auto_safe" {
            let why = p["why"].as_str().unwrap_or_default();
            assert!(why.contains("not allowed"), "{why}");
        }
    }
}

/// A TCP relay to the destination that can cut every connection through
/// it, and turn away new ones, until restored: a link that drops and
/// comes back.
struct CuttableLink {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl CuttableLink {
    fn to(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the link is down
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, open }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A post-copy through a `CuttableLink`, cut 300 ms after the VM started
/// on the destination (a slow push keeps post-copy going meanwhile).
struct CutMidPostcopy {
    dir: TempDir,
    src: FerryProc,
    socket: String,
    dst: FerryProc,
    link: CuttableLink,
    mig: FerryProc,
}

/// Source `dirty:256:max`, a destination that waits `dst_recovery` for a
/// lost source, `ferry migrate --mode postcopy --bandwidth 40MiB/s
/// MIGRATE_ARGS --json` through the link; returns once the link is cut.
fn cut_mid_postcopy(name: &str, dst_recovery: &str, migrate_args: &[&str]) -> CutMidPostcopy {
    let dir = TempDir::new(name);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "1", "dirty:256:max");
    let (mut dst, dst_port) = migration_destination(
        "destination",
        &[
            "--duration",
            "300s",
            "--json",
            "--recovery-timeout",
            dst_recovery,
        ],
    );
    let link = CuttableLink::to(dst_port);
    src.next_heartbeat(Duration::from_secs(10));
    let mut args = vec!["--mode", "postcopy", "--bandwidth", "40MiB/s"];
    args.extend_from_slice(migrate_args);
    args.push("--json");
    let mig = start_migrate("migrate", &socket, link.port, &args);
    dst.wait_line(Duration::from_secs(30), "the post-copy start", |_, text| {
        text.contains("post-copy: the VM runs here without")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    link.cut();
    CutMidPostcopy {
        dir,
        src,
        socket,
        dst,
        link,
        mig,
    }
}

/// Heartbeats printed by `p` so far, after reading what has arrived.
fn heartbeat_count(p: &mut FerryProc) -> usize {
    p.drain();
    p.heartbeats().len()
}

/// Heartbeats printed by `p` once it stopped printing: a source prints the
/// console lines its guest wrote during the migration only after the
/// migration returns, so those may still be arriving. Waits until none
/// came for 300 ms (at most 10 s).
fn settled_heartbeat_count(p: &mut FerryProc) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut count = heartbeat_count(p);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = heartbeat_count(p);
        if now == count {
            break;
        }
        count = now;
    }
    count
}

#[test]
fn link_dropped_mid_postcopy_then_restored_completes_verified() {
    let test = "link_dropped_mid_postcopy_then_restored_completes_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let CutMidPostcopy {
        dir: _dir,
        mut src,
        socket: _,
        mut dst,
        link,
        mut mig,
    } = cut_mid_postcopy("pc_link_drop", "30s", &[]);
    dst.wait_line(Duration::from_secs(10), "the lost link", |_, text| {
        text.contains("the link to the source failed").then_some(())
    });
    // While the link is down the guest waits on its missing pages, and
    // the source does not take its VM back.
    std::thread::sleep(Duration::from_millis(300));
    let (dst_before, src_before) = (heartbeat_count(&mut dst), heartbeat_count(&mut src));
    let down_for = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let (dst_after, src_after) = (heartbeat_count(&mut dst), heartbeat_count(&mut src));
    eprintln!(
        "{test}: while cut for {:?}: destination heartbeats {dst_before} -> {dst_after}, source {src_before} -> {src_after}",
        down_for.elapsed()
    );
    assert!(
        dst_after <= dst_before + 1,
        "the guest must not progress without its pages: {dst_before} -> {dst_after}"
    );
    assert_eq!(src_after, src_before, "the source must not resume its VM");
    link.restore();
    dst.wait_line(Duration::from_secs(30), "the reconnection", |_, text| {
        text.contains("the source reconnected").then_some(())
    });
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(90));
    assert_committed(status, &report, &mig);
    let pc = postcopy_figures(test, &report);
    assert!(pc["recoveries"].as_u64().unwrap() >= 1, "{pc:#}");
    let last = source_handed_over(&mut src, link.port);
    continues_verified(&mut dst, &last);
    assert!(
        dst.err.iter().any(|l| l.contains("post-copy complete")),
        "{}",
        dst.transcript()
    );
}

/// Every heartbeat on the destination continues the source's last one,
/// with no bad page, until the guest has rewritten (so verified) its whole
/// working set twice there.
fn continues_verified(dst: &mut FerryProc, last: &ferry_testguest::console::Heartbeat) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        heartbeat_count(dst);
        let hbs = dst.heartbeats();
        let first = hbs.first().expect("heartbeats on the destination").clone();
        assert_eq!(
            first.seq,
            last.seq + 1,
            "sequence must continue: {last:?} {first:?}"
        );
        for pair in hbs.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1, "sequence broke: {pair:?}");
        }
        assert!(hbs.iter().all(|h| h.err == 0), "bad pages: {hbs:?}");
        assert!(dst.page_errors().is_empty(), "{}", dst.transcript());
        if hbs.last().unwrap().sweeps >= first.sweeps + 2 {
            return;
        }
        assert!(Instant::now() < deadline, "no full sweep after the move");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_source_that_gave_up_resumes_on_the_operators_word() {
    let test = "a_source_that_gave_up_resumes_on_the_operators_word";
    if !kvm_or_skip(test) {
        return;
    }
    let CutMidPostcopy {
        dir: _dir,
        mut src,
        socket,
        mut dst,
        link,
        mut mig,
    } = cut_mid_postcopy("pc_resume", "60s", &["--recovery-timeout", "1s"]);
    // The source gives up after its second of retries, and says how to go on.
    let status = mig.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", mig.transcript());
    assert!(
        mig.err
            .iter()
            .any(|l| l.contains("ferry migrate SOCKET --resume")),
        "{}",
        mig.transcript()
    );
    // It keeps its VM, paused: alive, no heartbeat.
    let before = settled_heartbeat_count(&mut src);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        heartbeat_count(&mut src),
        before,
        "the source must not run its VM"
    );
    assert!(
        src.child.try_wait().unwrap().is_none(),
        "the source must keep its pages"
    );
    let last = src.heartbeats().last().cloned().expect("source heartbeats");
    link.restore();
    let mut resume = FerryProc::spawn("resume", &["migrate", &socket, "--resume", "--json"]);
    let (status, report) = finish_migrate(&mut resume, Duration::from_secs(90));
    assert_committed(status, &report, &resume);
    assert_eq!(report["mode"], "postcopy (resumed)", "{report:#}");
    postcopy_figures(test, &report);
    let status = src.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", src.transcript());
    assert!(src.page_errors().is_empty());
    continues_verified(&mut dst, &last);
}

#[test]
fn auto_picks_precopy_for_an_idle_guest_and_prints_its_prediction() {
    let test = "auto_picks_precopy_for_an_idle_guest_and_prints_its_prediction";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("auto_idle");
    let (mut src, socket) = migration_source(&dir, "source", "1G", "1", "idle");
    let (mut dst, port) = migration_destination("destination", &["--duration", "300s", "--json"]);
    src.next_heartbeat(Duration::from_secs(10));
    // No --mode: auto is the default.
    let mut mig = start_migrate("migrate", &socket, port, &["--json"]);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(60));
    assert_committed(status, &report, &mig);
    let said = mig
        .err
        .iter()
        .find(|l| l.starts_with("ferry: auto:"))
        .unwrap_or_else(|| panic!("no prediction printed\n{}", mig.transcript()));
    eprintln!("{test}: {said}");
    assert!(
        said.contains("predicted") && said.contains("chose precopy"),
        "{said}"
    );
    assert_eq!(report["mode"], "auto: precopy", "{report:#}");
    assert!(report["postcopy"].is_null(), "{report:#}");
    let last = source_handed_over(&mut src, port);
    // An idle guest has no working set to verify: its heartbeats must
    // continue the source's, with no error.
    let first = dst.next_heartbeat(Duration::from_secs(10));
    assert_eq!(first.seq, last.seq + 1, "{last:?} then {first:?}");
    let next = dst.next_heartbeat(Duration::from_secs(10));
    assert_eq!(next.seq, first.seq + 1);
    assert_eq!((first.err, next.err), (0, 0));
}
