//! The network handover's edges, on real KVM and real taps in the netlab
//! topology: a migration aborted before its commit announces nothing and
//! the client's connection goes on on host A; without the announce
//! (`ferry receive --no-announce`, a control) the switch keeps the VM's
//! MAC on host A, so the announce is what moves it; and one TCP connection
//! survives A to B and back to A. Every migration verifies guest memory.
//! Without root or /dev/kvm each test says SKIPPED and returns.

mod common;

use std::time::{Duration, Instant};

use common::migrations::stop_destination;
use common::net::{
    arrived, assert_kept_without_loss, can_run, client_is_answered, long_probe, migrate_committed,
    migrate_verified, net_source, receive_net_flag, serial, Committed, MAC,
};
use common::{
    migration_destination, start_migrate, verify_still_running, FerryProc, Stream, TempDir,
};
use ferry_netlab::{FdbPlace, Host, MacAddr, Topology};

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

    let receive_extra: &[&str] = if announce { &[] } else { &["--no-announce"] };
    let mut moved = migrate_committed(
        &dir,
        &topo,
        &socket,
        Host::B,
        "B",
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
        receive_extra,
    );
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
    arrived(&mut src, &mut moved);
    let Committed {
        mut dst, report, ..
    } = moved;
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
        let (
            Committed {
                dst,
                dst_socket,
                report,
                ..
            },
            first,
        ) = migrate_verified(
            &dir,
            &topo,
            from,
            socket,
            host,
            name,
            &["--mode", "precopy", "--downtime", "10ms", "--json"],
        );
        eprintln!(
            "{test}: on {name}: guest stall {} us; source forwarded {}",
            first.stall_us, report["network"]
        );
        assert_eq!(topo.fdb_place(mac).unwrap(), Some(place));
        (dst, dst_socket)
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
