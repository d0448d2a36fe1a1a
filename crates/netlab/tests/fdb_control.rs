//! The control the issue asks for, at the topology level: a stand-in moved
//! from host A's bridge to host B's is found by the switch only once it
//! announces itself; without the announce the switch keeps sending its
//! traffic to host A, where it is lost.

mod common;

use std::time::{Duration, Instant};

use common::{can_run, unique_prefix};
use ferry_netlab::{FdbPlace, Host, Probe, ProbeConfig, StandIn, Topology};

/// Waits (bounded) until `f` holds, returning how long it took.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn the_switch_follows_a_moved_stand_in_only_when_it_announces() {
    if !can_run("the_switch_follows_a_moved_stand_in_only_when_it_announces") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let mut standin = StandIn::start(&topo, 7000).unwrap();
    let mac = standin.mac();
    // UDP only: the stand-in then sends nothing unless it receives, so
    // nothing but an announce can teach the switch its new place.
    let config = ProbeConfig {
        tcp: false,
        ..ProbeConfig::default()
    };
    let probe = Probe::start_on(&topo, 7000, config).unwrap();
    assert!(wait_for(Duration::from_secs(2), || probe.received().1 >= 50).is_some());
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostA));
    assert_eq!(
        topo.fdb_port(mac).unwrap().as_deref(),
        Some(topo.names().switch.port_a.as_str())
    );

    // Moved, not announced: the switch still sends to host A, the echoes
    // stop.
    standin.move_to(Host::B).unwrap();
    let moved = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    let echoes_after_move = probe.received().1;
    std::thread::sleep(Duration::from_millis(400));
    let place_unannounced = topo.fdb_place(mac).unwrap();
    let echoes_unannounced = probe.received().1 - echoes_after_move;

    // Announced: the switch learns host B, the echoes resume.
    let announced = Instant::now();
    standin.announce().unwrap();
    let learnt = wait_for(Duration::from_secs(1), || {
        topo.fdb_place(mac).unwrap() == Some(FdbPlace::HostB)
    });
    let before = probe.received().1;
    let resumed = wait_for(Duration::from_secs(1), || probe.received().1 >= before + 10);
    let report = probe.stop();
    eprint!("{report}");
    eprintln!(
        "without announce, {:.0} ms after the move: switch has it at {place_unannounced:?}, {echoes_unannounced} echoes; announce learnt in {learnt:?}, echoes resumed in {resumed:?}",
        (announced - moved).as_secs_f64() * 1000.0,
    );

    assert_eq!(
        place_unannounced,
        Some(FdbPlace::HostA),
        "the switch moved without an announce"
    );
    assert_eq!(echoes_unannounced, 0, "echoes arrived without an announce");
    assert!(
        learnt.is_some_and(|d| d < Duration::from_millis(200)),
        "announce not learnt: {learnt:?}"
    );
    assert!(
        resumed.is_some(),
        "echoes did not resume after the announce"
    );
    // Everything sent in the unannounced window was lost: one silence at
    // least as long as the window.
    let udp = report.udp.unwrap();
    assert!(udp.lost > 0);
    assert!(udp.longest_gap.unwrap().longest_us >= 400_000);
}

#[test]
fn a_tcp_connection_survives_a_to_b_to_a_when_each_move_is_announced() {
    if !can_run("a_tcp_connection_survives_a_to_b_to_a_when_each_move_is_announced") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let mut standin = StandIn::start(&topo, 7000).unwrap();
    let mac = standin.mac();
    let probe = Probe::start_on(&topo, 7000, ProbeConfig::default()).unwrap();
    for host in [Host::B, Host::A] {
        std::thread::sleep(Duration::from_millis(400));
        standin.move_to(host).unwrap();
        standin.announce().unwrap();
        let want = if host == Host::A {
            FdbPlace::HostA
        } else {
            FdbPlace::HostB
        };
        assert!(
            wait_for(Duration::from_millis(500), || topo.fdb_place(mac).unwrap()
                == Some(want.clone()))
            .is_some(),
            "switch did not learn host {host}"
        );
    }
    std::thread::sleep(Duration::from_millis(600));
    let report = probe.stop();
    eprint!("{report}");
    let tcp = report.tcp.as_ref().unwrap();
    // What the move itself dropped (the link is down while it moves) TCP
    // retransmits: no reply is missing and the connection is the same.
    assert!(tcp.connection_kept, "{report}");
    assert_eq!(
        (tcp.resets, tcp.replies_missing, tcp.replies_duplicated),
        (0, 0, 0),
        "{report}"
    );
    assert_eq!(tcp.reply_counter_breaks, 0, "{report}");
    assert_eq!(standin.counters().tcp_conns, 1);
}
