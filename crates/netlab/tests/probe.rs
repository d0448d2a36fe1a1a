//! The client probe against the stand-in echo server: nothing lost, short
//! gaps, and clear errors for a probe that cannot start.

mod common;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::{can_run, unique_prefix};
use ferry_netlab::{in_netns, NetlabError, Probe, ProbeConfig, StandIn, Topology};

#[test]
fn the_probe_against_the_stand_in_loses_nothing() {
    if !can_run("the_probe_against_the_stand_in_loses_nothing") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let standin = StandIn::start(&topo, 7000).unwrap();
    let probe = Probe::start_on(&topo, 7000, ProbeConfig::default()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let report = probe.stop();
    eprint!("{report}");
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    let tcp = report.tcp.as_ref().unwrap();
    let udp = report.udp.as_ref().unwrap();
    // 2000 slots; a busy 2-core machine makes a sender at idle priority
    // skip many (reported as slots_skipped), but the rate holds up.
    assert!(tcp.requests_sent > 500, "{report}");
    assert_eq!(
        tcp.requests_sent, udp.probes_sent,
        "both go out in every slot"
    );
    assert_eq!(tcp.replies_received, tcp.requests_sent, "{report}");
    assert_eq!(
        (
            tcp.replies_missing,
            tcp.replies_duplicated,
            tcp.replies_out_of_order
        ),
        (0, 0, 0)
    );
    assert_eq!((tcp.replies_malformed, tcp.reply_counter_breaks), (0, 0));
    assert!(
        tcp.connection_kept && tcp.resets == 0 && tcp.reconnects == 0,
        "{report}"
    );
    // Nothing is lost, so nothing should be retransmitted; a starved
    // machine can still fire a tail-loss probe or two, which is not a loss.
    assert!(tcp.retransmissions <= 2, "{report}");
    assert_eq!((udp.lost, udp.duplicated), (0, 0), "{report}");
    // Short: well below a TCP retransmission timeout (200 ms at least),
    // which is what one lost packet would cost.
    let gap = tcp.longest_gap.as_ref().unwrap().longest_us;
    assert!(gap < 150_000, "longest TCP gap {gap} us: {report}");
    assert!(
        udp.longest_gap.as_ref().unwrap().longest_us < 150_000,
        "{report}"
    );
    assert_eq!(standin.counters().tcp_conns, 1);
    assert_eq!(standin.counters().udp_echoes, udp.probes_sent);
}

#[test]
fn a_probe_that_cannot_start_says_why() {
    let target = SocketAddrV4::new([10, 77, 0, 2].into(), 7000);
    let zero = ProbeConfig {
        interval: Duration::ZERO,
        ..ProbeConfig::default()
    };
    assert!(matches!(
        Probe::start("x", target, zero),
        Err(NetlabError::BadProbeConfig(_))
    ));
    let nothing = ProbeConfig {
        tcp: false,
        udp: false,
        ..ProbeConfig::default()
    };
    assert!(matches!(
        Probe::start("x", target, nothing),
        Err(NetlabError::BadProbeConfig(_))
    ));
    assert!(matches!(
        Probe::start("netlab-no-such-ns", target, ProbeConfig::default()),
        Err(NetlabError::EnterNetns { .. })
    ));
    if !can_run("a_probe_that_cannot_start_says_why (no listener)") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let _standin = StandIn::start(&topo, 7000).unwrap();
    // Nobody listens on 7999: the stand-in's kernel refuses at once.
    let err = match Probe::start_on(&topo, 7999, ProbeConfig::default()) {
        Err(e) => e,
        Ok(_) => panic!("a probe to a closed port started"),
    };
    assert!(matches!(err, NetlabError::Connect { .. }), "{err}");
    eprintln!("as expected: {err}");
}

#[test]
fn in_netns_changes_only_the_thread_it_makes() {
    if !can_run("in_netns_changes_only_the_thread_it_makes") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let client = SocketAddrV4::new(topo.client_ip(), 0);
    // The client's address exists only in the client's namespace.
    let inside = in_netns(topo.client_ns(), move || UdpSocket::bind(client)).unwrap();
    let socket = inside.expect("bind inside the client namespace");
    assert!(
        UdpSocket::bind(client).is_err(),
        "the caller moved namespace"
    );
    // The socket stays in the client's namespace: it reaches the client's
    // own address from here.
    let peer = in_netns(topo.client_ns(), move || {
        UdpSocket::bind(SocketAddrV4::new(client.ip().to_owned(), 0))
    })
    .unwrap()
    .unwrap();
    socket.send_to(b"x", peer.local_addr().unwrap()).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(peer.recv(&mut buf).unwrap(), 1);
    // A panic inside is the caller's panic.
    let caught = std::panic::catch_unwind(|| in_netns(topo.client_ns(), || panic!("inside")));
    assert!(caught.is_err());
}

#[test]
fn a_second_stand_in_is_refused_and_the_first_keeps_serving() {
    if !can_run("a_second_stand_in_is_refused_and_the_first_keeps_serving") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    let first = StandIn::start(&topo, 7000).unwrap();
    let err = match StandIn::start(&topo, 7000) {
        Err(e) => e,
        Ok(_) => panic!("two stand-ins on one topology"),
    };
    assert!(matches!(err, NetlabError::Command { .. }), "{err}");
    eprintln!("as expected: {err}");
    let probe = Probe::start_on(&topo, 7000, ProbeConfig::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let report = probe.stop();
    assert_eq!(report.tcp.unwrap().replies_missing, 0);
    assert!(first.counters().tcp_replies > 0);
}

#[test]
fn a_closed_connection_is_reported_and_reconnected_when_asked() {
    if !can_run("a_closed_connection_is_reported_and_reconnected_when_asked") {
        return;
    }
    let topo = Topology::up(&unique_prefix()).unwrap();
    for reconnect in [false, true] {
        let standin = StandIn::start(&topo, 7000).unwrap();
        let config = ProbeConfig {
            reconnect,
            ..ProbeConfig::default()
        };
        let probe = Probe::start_on(&topo, 7000, config).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // The server goes away (closing its connection) and comes back.
        drop(standin);
        let standin = StandIn::start(&topo, 7000).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let report = probe.stop();
        eprint!("reconnect {reconnect}: {report}");
        let tcp = report.tcp.as_ref().unwrap();
        assert!(!tcp.connection_kept, "{report}");
        assert!(tcp.last_error.is_some());
        let breaks = tcp.closed_by_peer + tcp.resets;
        if reconnect {
            // A reconnect can reach the old server in its last moments and
            // break again: every break is followed by a reconnect.
            assert!(tcp.reconnects >= 1, "{report}");
            assert_eq!(breaks, tcp.reconnects, "{report}");
            assert!(standin.counters().tcp_conns >= 1);
            assert!(standin.counters().tcp_replies > 100, "{report}");
        } else {
            assert_eq!(breaks, 1, "{report}");
            assert!(tcp.requests_unsent > 100, "{report}");
            assert_eq!(tcp.reconnects, 0);
            assert_eq!(standin.counters().tcp_conns, 0);
        }
    }
}
