//! Live migrations that fail: a destination killed mid-way, a link cut in
//! the blackout, a corrupted frame, a destination that refuses the VM, no
//! destination at all, and bad command lines. Every time the VM must end
//! up running on the source and still verifying its memory, `ferry migrate`
//! must say why it failed (exit 1), and the destination must hold no VM.
//!
//! And two that must not fail: the link cut at the Commit or at the
//! Committed. The source decided to commit, so it comes back on a new
//! connection to repeat that, and the VM must end up running, verified, on
//! the destination, exactly once.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::migrations::{
    assert_committed, destination_holds_nothing, finish_migrate, log_rounds, migrate_failed,
    source_handed_over, source_runs_on_after_failure, stop_destination,
};
use common::{
    kvm_or_skip, migration_destination, migration_destination_with_api, migration_source,
    start_migrate, verify_arrival, FerryProc, Stream, TempDir,
};
use ferry_testguest::console::Heartbeat;

const HEADER_LEN: usize = 20;
const KIND_PAGES: u16 = 6;
const KIND_STATE: u16 = 8;
const KIND_STATE_LOADED: u16 = 9;
const KIND_COMMIT: u16 = 10;
const KIND_COMMITTED: u16 = 11;

// ---------------------------------------------------------------------------
// A TCP proxy that understands frame headers in the source -> destination
// direction and can break the stream on purpose.

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Cut both connections when a State frame's header arrives; the
    /// frame is not forwarded.
    CutAtState,
    /// Flip one byte in the middle of the payload of the `n`th Pages frame
    /// (1-based), then forward it.
    CorruptPages(usize),
    /// Cut both connections when the source's Commit arrives (it is not
    /// forwarded); relay any later connection untouched.
    DropCommit,
    /// Forward the Commit, cut both connections when the destination's
    /// Committed arrives (it is not forwarded); relay any later connection
    /// untouched.
    DropCommitted,
    /// Cut both connections when the destination's StateLoaded arrives
    /// (it is not forwarded); relay any later connection untouched.
    DropStateLoaded,
}

impl Fault {
    /// The commit faults leave the source a way back to the destination.
    fn relays_later_connections(self) -> bool {
        matches!(
            self,
            Self::DropCommit | Self::DropCommitted | Self::DropStateLoaded
        )
    }
}

#[derive(Debug, Default)]
struct ProxyLog {
    /// Frame kinds forwarded source -> destination, in order.
    kinds: Vec<u16>,
    /// Frame kinds forwarded destination -> source, in order.
    back_kinds: Vec<u16>,
    /// What the proxy did on purpose.
    fault_done: Option<String>,
    /// Why each direction ended.
    ended: Vec<String>,
    /// Connections relayed untouched after the first.
    later_connections: usize,
}

struct Proxy {
    port: u16,
    log: Arc<Mutex<ProxyLog>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 for one connection, and relays it to
    /// 127.0.0.1:`to` with `fault` (and, for the commit faults, any later
    /// connection as it is).
    fn start(to: u16, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(ProxyLog::default()));
        let shared = log.clone();
        let thread = std::thread::spawn(move || {
            // Bounded: the test gives up on the proxy after a minute.
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let source = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            };
            source.set_nonblocking(false).unwrap();
            let dest = TcpStream::connect(("127.0.0.1", to)).expect("proxy connect");
            for s in [&source, &dest] {
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            }
            let back = {
                let (from, to) = (dest.try_clone().unwrap(), source.try_clone().unwrap());
                let log = shared.clone();
                std::thread::spawn(move || relay_back(from, to, fault, &log))
            };
            relay_frames(source, dest, fault, &shared);
            let _ = back.join();
            if fault.relays_later_connections() {
                relay_later_connections(&listener, to, deadline, &shared);
            }
        });
        Self {
            port,
            log,
            thread: Some(thread),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, ProxyLog> {
        self.log.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The relays end when either side closes (the processes are killed
        // on drop, or ended); never wait long for them.
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Every connection after the first, byte for byte both ways, until
/// `deadline`.
fn relay_later_connections(
    listener: &TcpListener,
    to: u16,
    deadline: Instant,
    log: &Mutex<ProxyLog>,
) {
    while Instant::now() < deadline {
        let source = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        log.lock().unwrap().later_connections += 1;
        source.set_nonblocking(false).unwrap();
        let Ok(dest) = TcpStream::connect(("127.0.0.1", to)) else {
            continue; // the destination is gone: the source sees a close
        };
        for (mut from, mut into) in [
            (source.try_clone().unwrap(), dest.try_clone().unwrap()),
            (dest, source),
        ] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut into);
                let _ = into.shutdown(Shutdown::Write);
            });
        }
    }
}

/// Destination -> source, one frame at a time (logged, never changed);
/// passes on an end of stream as a half close, and an error as a cut.
fn relay_back(mut from: TcpStream, mut to: TcpStream, fault: Fault, log: &Mutex<ProxyLog>) {
    let mut payload = Vec::new();
    let why = loop {
        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = from.read_exact(&mut header) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                let _ = to.shutdown(Shutdown::Write);
            } else {
                cut(&from, &to);
            }
            break format!("reading from the destination: {e}");
        }
        let kind = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let dropped = match fault {
            Fault::DropCommitted if kind == KIND_COMMITTED => Some("Committed"),
            Fault::DropStateLoaded if kind == KIND_STATE_LOADED => Some("StateLoaded"),
            _ => None,
        };
        if let Some(what) = dropped {
            log.lock().unwrap().fault_done =
                Some(format!("cut both connections at the destination's {what}"));
            cut(&from, &to);
            break format!("cut at {what}");
        }
        payload.resize(len, 0);
        if let Err(e) = from.read_exact(&mut payload) {
            cut(&from, &to);
            break format!("destination ended inside a payload: {e}");
        }
        log.lock().unwrap().back_kinds.push(kind);
        if let Err(e) = to.write_all(&header).and_then(|()| to.write_all(&payload)) {
            cut(&from, &to);
            break format!("writing to the source: {e}");
        }
    };
    log.lock().unwrap().ended.push(format!("back: {why}"));
}

/// Source -> destination, one frame at a time, applying `fault`.
fn relay_frames(mut from: TcpStream, mut to: TcpStream, fault: Fault, log: &Mutex<ProxyLog>) {
    let mut pages_seen = 0usize;
    let mut payload = Vec::new();
    let why = loop {
        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = from.read_exact(&mut header) {
            // A clean end between frames is passed on as a half close.
            let _ = to.shutdown(Shutdown::Write);
            break format!("source ended: {e}");
        }
        assert_eq!(&header[0..2], b"FY", "not a Ferry frame: {header:02x?}");
        let kind = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        if matches!(fault, Fault::CutAtState) && kind == KIND_STATE {
            log.lock().unwrap().fault_done = Some(format!(
                "cut both connections at a State frame of {len} bytes"
            ));
            cut(&from, &to);
            break "cut at State".to_string();
        }
        if matches!(fault, Fault::DropCommit) && kind == KIND_COMMIT {
            log.lock().unwrap().fault_done =
                Some("cut both connections at the source's Commit".into());
            cut(&from, &to);
            break "cut at Commit".to_string();
        }
        payload.resize(len, 0);
        if let Err(e) = from.read_exact(&mut payload) {
            cut(&from, &to);
            break format!("source ended inside a payload: {e}");
        }
        if kind == KIND_PAGES {
            pages_seen += 1;
            if let Fault::CorruptPages(n) = fault {
                if pages_seen == n && len > 0 {
                    let at = len / 2;
                    payload[at] ^= 0x5a;
                    log.lock().unwrap().fault_done =
                        Some(format!("flipped byte {at} of {len} in Pages frame #{n}"));
                }
            }
        }
        log.lock().unwrap().kinds.push(kind);
        if let Err(e) = to.write_all(&header).and_then(|()| to.write_all(&payload)) {
            cut(&from, &to);
            break format!("writing to the destination: {e}");
        }
    };
    log.lock().unwrap().ended.push(format!("forward: {why}"));
}

/// A 512 MiB source with two vCPUs rewriting 64 MiB, a proxy with `fault`
/// in front of the destination at `dst_port`, and a pre-copy
/// `ferry migrate --json` through it, started once the guest runs.
fn migrate_through_proxy(
    dir: &TempDir,
    dst_port: u16,
    fault: Fault,
) -> (FerryProc, Proxy, FerryProc) {
    let (mut src, socket) = migration_source(dir, "source", "512M", "2", "dirty:64:100");
    let proxy = Proxy::start(dst_port, fault);
    src.next_heartbeat(Duration::from_secs(10));
    let mig = start_migrate(
        "migrate",
        &socket,
        proxy.port,
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
    );
    (src, proxy, mig)
}

// ---------------------------------------------------------------------------

#[test]
fn destination_killed_in_round_two() {
    let test = "destination_killed_in_round_two";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "2", "dirty:256:max");
    let (mut dst, port) = migration_destination("destination", &[]);
    src.next_heartbeat(Duration::from_secs(10));
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &[
            "--mode",
            "precopy",
            "--bandwidth",
            "300MiB/s",
            "--downtime",
            "10ms",
        ],
    );
    mig.wait_line(Duration::from_secs(30), "`ferry: round 2:`", |s, text| {
        (s == Stream::Err && text.starts_with("ferry: round 2:")).then_some(())
    });
    dst.kill();
    let t = Instant::now();
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!(
        "{test}: ferry migrate failed {:.0} ms after the kill: {reason}",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the source must notice a dead destination promptly"
    );
    source_runs_on_after_failure(&mut src, port);
    destination_holds_nothing(&mut dst, true);
}

#[test]
fn connection_dropped_during_blackout() {
    let test = "connection_dropped_during_blackout";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut dst, dst_port) = migration_destination("destination", &[]);
    let (mut src, proxy, mut mig) = migrate_through_proxy(&dir, dst_port, Fault::CutAtState);
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: ferry migrate: {reason}");
    {
        let log = proxy.log();
        eprintln!("{test}: proxy: {log:?}");
        assert!(
            log.fault_done.is_some(),
            "the migration never reached the State frame: {log:?}"
        );
    }
    assert!(
        mig.err.iter().any(|l| l.starts_with("ferry: blackout ")),
        "the migration must have been in its blackout\n{}",
        mig.transcript()
    );
    source_runs_on_after_failure(&mut src, proxy.port);
    destination_holds_nothing(&mut dst, false);
}

#[test]
fn corrupt_frame_is_refused() {
    let test = "corrupt_frame_is_refused";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut dst, dst_port) = migration_destination("destination", &[]);
    let (mut src, proxy, mut mig) = migrate_through_proxy(&dir, dst_port, Fault::CorruptPages(3));
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: ferry migrate: {reason}");
    {
        let log = proxy.log();
        eprintln!(
            "{test}: proxy: {:?}; destination -> source frame kinds {:?}; {:?}",
            log.fault_done, log.back_kinds, log.ended
        );
        assert!(
            log.fault_done.is_some(),
            "the proxy never corrupted a frame: {log:?}"
        );
    }
    // Whatever it says, the VM must run on here, and nothing there.
    source_runs_on_after_failure(&mut src, proxy.port);
    destination_holds_nothing(&mut dst, false);
    let dst_said = dst.stderr_text();
    assert!(
        dst_said.contains("checksum"),
        "the destination must name the checksum mismatch\n{dst_said}"
    );
    let lower = reason.to_lowercase();
    assert!(
        lower.contains("checksum") || lower.contains("destination aborted"),
        "ferry migrate must say that the destination found a bad checksum or aborted, not: {reason}"
    );
}

#[test]
fn incompatible_destination_refuses() {
    let test = "incompatible_destination_refuses";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "2", "dirty:256:100");
    let (mut dst, port) = migration_destination("destination", &["--max-mem", "512M"]);
    let before = src.next_heartbeat(Duration::from_secs(10));
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--mode", "precopy", "--downtime", "10ms"],
    );
    let reason = migrate_failed(&mut mig, Duration::from_secs(30));
    eprintln!("{test}: ferry migrate: {reason}");
    assert!(
        reason.contains("--max-mem") && reason.contains("512 MiB") && reason.contains("1024 MiB"),
        "the reason must name the memory limit: {reason}"
    );
    destination_holds_nothing(&mut dst, false);
    let after = source_runs_on_after_failure(&mut src, port);
    // The VM never paused: from the heartbeat before the attempt to half a
    // second after the source said it failed, no stall near a blackout.
    let until = after[0].seq + 5;
    let around: Vec<Heartbeat> = src
        .heartbeats()
        .into_iter()
        .filter(|h| h.seq > before.seq && h.seq <= until)
        .collect();
    let stalls: Vec<u64> = around.iter().map(|h| h.stall_us).collect();
    let worst = stalls.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{test}: heartbeats {}..={until} around the attempt, stall_us {stalls:?}",
        before.seq + 1
    );
    assert!(
        around.len() >= 5,
        "too few heartbeats around the attempt: {around:?}"
    );
    assert!(
        worst < 50_000,
        "the source VM stalled {worst} us: it must not pause for a refused migration"
    );
}

#[test]
fn nothing_listening() {
    let test = "nothing_listening";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "256M", "1", "dirty:32:100");
    src.next_heartbeat(Duration::from_secs(10));
    let t = Instant::now();
    let mut mig = start_migrate("migrate", &socket, 1, &[]);
    let reason = migrate_failed(&mut mig, Duration::from_secs(20));
    let took = t.elapsed();
    eprintln!("{test}: failed in {took:?}: {reason}");
    assert!(
        reason.contains("cannot connect") && reason.contains("127.0.0.1:1"),
        "the reason must say it cannot connect to 127.0.0.1:1: {reason}"
    );
    assert!(
        took < Duration::from_secs(6),
        "must fail fast, took {took:?}"
    );
    source_runs_on_after_failure(&mut src, 1);
}

/// Runs `ferry ARGS` to its end (bounded) and returns (exit code, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let mut p = FerryProc::spawn(&format!("ferry {}", args[0]), args);
    let status = p.wait_exit(Duration::from_secs(20));
    (status.code(), p.err.join("\n"), p.out.join("\n"))
}

#[test]
fn bad_command_lines_say_why() {
    // No VM needed.
    let (code, err, _) = run_to_end(&["receive", "--listen", "not-an-address"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--listen not-an-address") && err.contains("cannot listen"),
        "{err}"
    );

    let dir = TempDir::new("bad_command_lines_say_why");
    let missing = dir.path("no-such-vm.sock");
    let (code, err, _) = run_to_end(&[
        "migrate",
        &missing,
        "--to",
        "127.0.0.1:1",
        "--insecure-plaintext",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&missing) && err.contains("cannot reach a VM"),
        "the error must name the socket: {err}"
    );

    for (flag, value, words) in [
        ("--bandwidth", "0", &["--bandwidth", "'0'"][..]),
        (
            "--bandwidth",
            "0MiB/s",
            &["--bandwidth", "send nothing"][..],
        ),
        (
            "--bandwidth",
            "fast",
            &["--bandwidth", "'fast'", "not a size"][..],
        ),
        ("--downtime", "5", &["--downtime", "'5'", "no unit"][..]),
        ("--cpu-share", "95", &["--cpu-share", "0 to 90"][..]),
        (
            "--max-downtime",
            "5ms",
            &["--max-downtime", "below --downtime"][..],
        ),
    ] {
        let (code, err, out) = run_to_end(&["migrate", &missing, "--to", "X", flag, value]);
        assert!(
            code.is_some_and(|c| c != 0),
            "{flag} {value} must be refused: {code:?}"
        );
        assert!(out.is_empty(), "nothing on stdout for a bad flag: {out}");
        for w in words {
            assert!(err.contains(w), "{flag} {value}: expected {w:?} in: {err}");
        }
        assert!(
            !err.contains("cannot reach a VM"),
            "{flag} {value} must be refused before anything is tried: {err}"
        );
    }
}

/// The link breaks at the commit (`fault`); the source must come back,
/// repeat its decision, and the VM must run verified on the destination.
fn commit_survives(test: &str, fault: Fault) {
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut dst, dst_port, _dst_socket) = migration_destination_with_api(&dir, "destination");
    let (mut src, proxy, mut mig) = migrate_through_proxy(&dir, dst_port, fault);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(90));
    {
        let log = proxy.log();
        eprintln!("{test}: proxy: {log:?}");
        assert!(
            log.fault_done.is_some(),
            "the proxy never cut the link: {log:?}"
        );
        assert!(
            log.later_connections >= 1,
            "the source never came back: {log:?}"
        );
    }
    assert_committed(status, &report, &mig);
    log_rounds(test, &report);
    let recovered = report["blackout"]["commit_recovered"]
        .as_str()
        .unwrap_or_else(|| panic!("no commit_recovered in the report: {report:#}"));
    eprintln!("{test}: commit recovered: {recovered}");
    assert!(
        recovered.contains("confirmed on a new connection"),
        "{recovered}"
    );
    let last = source_handed_over(&mut src, proxy.port);
    let (first, _) = verify_arrival(&mut dst, &last, Duration::from_secs(30));
    let reported = report["guest"]["first_seq"].as_u64();
    match fault {
        // The decision came on the new connection, and so does the
        // guest's report.
        Fault::DropCommit => assert_eq!(reported, Some(first.seq)),
        // The destination sends the guest's report on the link it
        // committed on, which is gone: the report may not have it.
        _ => assert!(reported.is_none() || reported == Some(first.seq)),
    }
    stop_destination(&mut dst);
}

#[test]
fn commit_lost_on_the_link_is_repeated_and_the_vm_moves() {
    commit_survives(
        "commit_lost_on_the_link_is_repeated_and_the_vm_moves",
        Fault::DropCommit,
    );
}

#[test]
fn committed_lost_on_the_link_is_confirmed_and_the_vm_moves() {
    commit_survives(
        "committed_lost_on_the_link_is_confirmed_and_the_vm_moves",
        Fault::DropCommitted,
    );
}

#[test]
fn state_acknowledgment_lost_leaves_the_vm_on_the_source() {
    let test = "state_acknowledgment_lost_leaves_the_vm_on_the_source";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    // A long wait for the decision: the destination must end because the
    // source came back to withdraw, not because the wait ran out.
    let (mut dst, dst_port) = migration_destination("destination", &["--recovery-timeout", "60s"]);
    let (mut src, proxy, mut mig) = migrate_through_proxy(&dir, dst_port, Fault::DropStateLoaded);
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: ferry migrate: {reason}");
    let t = Instant::now();
    source_runs_on_after_failure(&mut src, proxy.port);
    destination_holds_nothing(&mut dst, false);
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "the destination waited out its window instead of hearing the source"
    );
    assert!(
        dst.err.iter().any(|l| l.contains("chose to abort")),
        "the destination must say the source withdrew\n{}",
        dst.transcript()
    );
    let log = proxy.log();
    assert!(log.fault_done.is_some(), "{log:?}");
    assert!(
        log.later_connections >= 1,
        "the source never came back: {log:?}"
    );
}

/// `--max-downtime` is a hard limit: with 2 vCPUs the fixed costs of a
/// blackout alone (state, commit, resume) predict more than 1 ms, so the
/// brake rises to its end, the prediction stays above the limit, and the
/// migration gives up with the VM running, verified, on the source, and
/// the destination holding nothing.
#[test]
fn max_downtime_that_cannot_be_met_aborts_with_the_vm_on_the_source() {
    let test = "max_downtime_that_cannot_be_met_aborts_with_the_vm_on_the_source";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "2", "dirty:64:200");
    let (mut dst, port) = migration_destination("destination", &[]);
    src.next_heartbeat(Duration::from_secs(10));
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &[
            "--mode",
            "precopy",
            "--downtime",
            "1ms",
            "--max-downtime",
            "1ms",
            "--json",
        ],
    );
    let reason = migrate_failed(&mut mig, Duration::from_secs(120));
    assert!(
        reason.contains("--max-downtime 1.0 ms") && reason.contains("downtime limit"),
        "the reason must name the limit: {reason}"
    );
    source_runs_on_after_failure(&mut src, port);
    destination_holds_nothing(&mut dst, false);
}
