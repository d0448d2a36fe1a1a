//! The network handover's edges, on real KVM and real taps in the netlab
//! topology: a migration aborted before its commit announces nothing and
//! the client's connection goes on on host A; without the announce
//! (`ferry receive --no-announce`, a control) the switch keeps the VM's
//! MAC on host A, so the announce is what moves it; and one TCP connection
//! survives A to B and back to A. Every migration verifies guest memory.
//! Without root or /dev/kvm each test says SKIPPED and returns.

mod common;

use std::time::{Duration, Instant};

use common::migrations::{assert_committed, finish_migrate, source_handed_over, stop_destination};
use common::net::{can_run, client_is_answered, net_source, receive_net_flag, serial, MAC, PORT};
use common::{
    migration_destination, start_migrate, verify_arrival, verify_still_running, FerryProc, Stream,
    TempDir,
};
use ferry_netlab::{FdbPlace, Host, MacAddr, Probe, ProbeConfig, ProbeReport, Topology};

/// The client's probe over one connection for the whole test.
fn long_probe(topo: &Topology) -> Probe {
    Probe::start_on(
        topo,
        PORT,
        ProbeConfig {
            max_duration: Duration::from_secs(60),
            ..ProbeConfig::default()
        },
    )
    .expect("the client connects on host A")
}

/// Prints the probe's figures and asserts the connection was kept with
/// nothing lost and no reset (the survival test's tolerance), over at
/// least `min_requests` requests.
fn assert_kept_without_loss(test: &str, report: &ProbeReport, min_requests: u64) {
    let tcp = report.tcp.as_ref().expect("a TCP report");
    let udp = report.udp.as_ref().expect("a UDP report");
    eprintln!(
        "{test}: TCP {} sent, {} replies, {} missing, {} resets, kept {}, longest gap {:?}, retransmissions {}; UDP {} sent, {} lost, longest gap {:?}",
        tcp.requests_sent,
        tcp.replies_received,
        tcp.replies_missing,
        tcp.resets,
        tcp.connection_kept,
        tcp.longest_gap,
        tcp.retransmissions,
        udp.probes_sent,
        udp.lost,
        udp.longest_gap
    );
    assert!(tcp.connection_kept, "{report:?}");
    assert_eq!(tcp.resets, 0, "{report:?}");
    assert_eq!(tcp.replies_missing, 0, "{report:?}");
    assert_eq!(udp.lost, 0, "{report:?}");
    assert!(tcp.requests_sent >= min_requests, "{report:?}");
}

/// Lines of a `ferry receive` that show it announced (or started to).
fn announce_lines(dst: &FerryProc) -> Vec<String> {
    dst.err
        .iter()
        .filter(|l| l.contains("announcing it here") || l.contains("announced the VM's MAC"))
        .cloned()
        .collect()
}

#[test]
fn an_abort_mid_migration_announces_nothing_and_the_connection_continues_on_a() {
    let _serial = serial();
    let test = "an_abort_mid_migration_announces_nothing_and_the_connection_continues_on_a";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnabort", 86).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    let mac: MacAddr = MAC.parse().unwrap();
    let probe = long_probe(&topo);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostA));

    let net_b = receive_net_flag(&topo, Host::B);
    let (mut dst, port) = migration_destination("B", &["--net", &net_b, "--duration", "300s"]);
    // A slow first pass, so that the kill lands well before any blackout.
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--mode", "precopy", "--bandwidth", "20MiB/s"],
    );
    mig.wait_line(Duration::from_secs(20), "`ferry: round 1:`", |s, text| {
        (s == Stream::Err && text.starts_with("ferry: round 1:")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    dst.kill();
    let status = mig.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", mig.transcript());
    let reason = mig
        .err
        .iter()
        .find_map(|l| l.strip_prefix("ferry: migration failed: "))
        .unwrap_or_else(|| panic!("no failure line\n{}", mig.transcript()))
        .to_owned();
    eprintln!("{test}: ferry migrate: {reason}");
    assert!(
        reason.ends_with("; the VM is running on the source"),
        "{reason}"
    );
    assert!(
        !mig.err.iter().any(|l| l.starts_with("ferry: blackout ")),
        "the abort must come before the blackout\n{}",
        mig.transcript()
    );
    dst.drain();
    assert!(dst.heartbeats().is_empty(), "no VM may run on B");
    assert_eq!(
        announce_lines(&dst),
        Vec::<String>::new(),
        "B must announce nothing on an abort"
    );
    // Verified on A, and the client's traffic still goes to A.
    verify_still_running(&mut src, Duration::from_secs(30));
    assert_eq!(
        topo.fdb_place(mac).unwrap(),
        Some(FdbPlace::HostA),
        "the switch must still place the VM on host A"
    );
    let report = probe.stop();
    assert_kept_without_loss(test, &report, 500);
    client_is_answered(&topo, "still on host A");
    src.kill();
    topo.down().unwrap();
}

/// One migration from A to B of a VM the client has just talked to, with
/// no traffic during the move (a quiet guest sends nothing that would
/// teach the switch), with or without B's announce. Returns how long after
/// the commit the switch placed the MAC on B, if it did within `watch`.
fn quiet_move(test: &str, prefix: &str, subnet: u16, announce: bool) -> Option<Duration> {
    let what = if announce {
        "with the announce"
    } else {
        "with --no-announce"
    };
    let topo = Topology::up_on_subnet(prefix, subnet).expect("topology");
    let dir = TempDir::new(&format!("{test}-{prefix}"));
    let (mut src, socket) = net_source(&dir, &topo);
    client_is_answered(&topo, "on host A");
    let mac: MacAddr = MAC.parse().unwrap();
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostA));

    let net_b = receive_net_flag(&topo, Host::B);
    let dst_socket = dir.path("B.sock");
    let mut args = vec![
        "--net",
        &net_b,
        "--api",
        &dst_socket,
        "--duration",
        "300s",
        "--json",
    ];
    if !announce {
        args.push("--no-announce");
    }
    let (mut dst, port) = migration_destination("B", &args);
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
    );
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(60));
    assert_committed(status, &report, &mig);
    let committed = Instant::now();
    // Polled every 5 ms for 3 s: the announce schedule's five frames go
    // out within 800 ms of the destination starting the VM, which on a
    // loaded host may itself come a few hundred ms after `ferry migrate`
    // reports the commit.
    let watch = Duration::from_secs(3);
    let mut learnt = None;
    while committed.elapsed() < watch {
        if topo.fdb_place(mac).unwrap() == Some(FdbPlace::HostB) {
            learnt = Some(committed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let place = topo.fdb_place(mac).unwrap();
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(30));
    eprintln!(
        "{test} ({what}): the switch placed the MAC on B {} after the commit (then {place:?}); source forwarded {}; announce lines {:?}",
        learnt.map_or(format!("not within {watch:?}"), |d| format!("{d:?}")),
        report["network"],
        announce_lines(&dst)
    );
    if !announce {
        assert_eq!(announce_lines(&dst), Vec::<String>::new());
        assert!(
            dst.err.iter().any(|l| l.contains("--no-announce")),
            "{}",
            dst.transcript()
        );
    }
    stop_destination(&mut dst);
    topo.down().unwrap();
    learnt
}

#[test]
fn without_the_announce_the_gap_grows() {
    let _serial = serial();
    let test = "without_the_announce_the_gap_grows";
    if !can_run(test) {
        return;
    }
    let announced = quiet_move(test, "fnann", 87, true);
    let silent = quiet_move(test, "fnsilent", 88, false);
    eprintln!(
        "{test}: time until the switch placed the MAC on B: {announced:?} with the announce, {silent:?} without"
    );
    let announced = announced.expect("the announce must move the MAC to B on the switch");
    match silent {
        None => {}
        Some(silent) => assert!(
            silent > announced,
            "without the announce the switch must learn B later: {silent:?} vs {announced:?}"
        ),
    }
}

#[test]
fn a_to_b_to_a_keeps_the_connection() {
    let _serial = serial();
    let test = "a_to_b_to_a_keeps_the_connection";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnaba", 89).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    let mac: MacAddr = MAC.parse().unwrap();
    let probe = long_probe(&topo);
    std::thread::sleep(Duration::from_millis(500));

    let hop = |from: &mut FerryProc,
               socket: &str,
               host: Host,
               name: &str,
               place: FdbPlace|
     -> (FerryProc, String) {
        let net = receive_net_flag(&topo, host);
        let api = dir.path(&format!("{name}.sock"));
        let (mut dst, port) = migration_destination(
            name,
            &["--net", &net, "--api", &api, "--duration", "300s", "--json"],
        );
        let mut mig = start_migrate(
            &format!("migrate to {name}"),
            socket,
            port,
            &["--mode", "precopy", "--downtime", "10ms", "--json"],
        );
        let (status, report) = finish_migrate(&mut mig, Duration::from_secs(60));
        assert_committed(status, &report, &mig);
        let last = source_handed_over(from, port);
        let (first, _) = verify_arrival(&mut dst, &last, Duration::from_secs(30));
        eprintln!(
            "{test}: on {name}: guest stall {} us; source forwarded {}",
            first.stall_us, report["network"]
        );
        assert_eq!(topo.fdb_place(mac).unwrap(), Some(place));
        (dst, api)
    };
    let (mut on_b, b_socket) = hop(&mut src, &socket, Host::B, "B", FdbPlace::HostB);
    std::thread::sleep(Duration::from_millis(500));
    let (mut back_on_a, _) = hop(&mut on_b, &b_socket, Host::A, "A2", FdbPlace::HostA);
    std::thread::sleep(Duration::from_millis(1000));
    let report = probe.stop();
    assert_kept_without_loss(test, &report, 1000);
    stop_destination(&mut back_on_a);
    topo.down().unwrap();
}
