//! The topology script driven through `Topology`: what it makes, that it
//! removes all of it (also when the test body panics), that it rebuilds a
//! half-made topology, and that two topologies coexist.

mod common;

use std::time::Duration;

use common::{can_run, leftovers, namespaces, root_interfaces, sh, unique_prefix};
use ferry_netlab::{
    in_netns, Host, NetlabError, Probe, ProbeConfig, StandIn, Topology, TopologyState,
};

#[test]
fn up_makes_the_whole_topology_and_down_leaves_nothing_behind() {
    if !can_run("up_makes_the_whole_topology_and_down_leaves_nothing_behind") {
        return;
    }
    let prefix = unique_prefix();
    let root_before = root_interfaces();
    let topo = Topology::up(&prefix).unwrap();
    let n = topo.names().clone();
    let tag = n.tag.clone();
    assert!(n.tag.len() <= 8);

    let ns = namespaces();
    for want in [&n.switch.ns, &n.host_a.ns, &n.host_b.ns, &n.client.ns] {
        assert!(
            ns.contains(want.as_str()),
            "namespace {want} missing: {ns:?}"
        );
    }
    for host in [Host::A, Host::B] {
        let h = topo.host(host);
        let tap = sh("ip", &["-n", &h.ns, "-d", "link", "show", &h.tap]);
        assert!(tap.contains("tun type tap"), "{tap}");
        assert!(
            tap.contains("vnet_hdr on") && tap.contains("persist on"),
            "{tap}"
        );
        assert!(tap.contains(&format!("master {}", h.bridge)), "{tap}");
        let uplink = sh("ip", &["-n", &h.ns, "link", "show", &h.uplink]);
        assert!(uplink.contains(&format!("master {}", h.bridge)), "{uplink}");
        let br = sh("ip", &["-n", &h.ns, "-d", "link", "show", &h.bridge]);
        assert!(
            br.contains("forward_delay 0") && br.contains("stp_state 0"),
            "{br}"
        );
        let port = sh(
            "ip",
            &["-n", &n.switch.ns, "link", "show", n.switch_port(host)],
        );
        assert!(
            port.contains(&format!("master {}", n.switch.bridge)),
            "{port}"
        );
    }
    let client = sh(
        "ip",
        &["-n", &n.client.ns, "-4", "addr", "show", &n.client.ifname],
    );
    assert!(client.contains(&format!("{}/24", n.client_ip)), "{client}");
    // Every name fits IFNAMSIZ.
    for name in [
        &n.switch.bridge,
        &n.switch.port_a,
        &n.host_a.tap,
        &n.host_b.bridge,
        &n.client.ifname,
        &n.standin.port,
    ] {
        assert!(name.len() <= 15, "{name}");
    }
    // No IPv6 to chatter in the namespaces.
    let v6 = in_netns(&n.client.ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
    });
    if let Ok(Ok(v)) = v6 {
        // /proc/sys/net follows the reading thread's namespace.
        assert_eq!(v.trim(), "1");
    }
    // The root namespace got nothing of ours (other helpers' interfaces
    // may come and go meanwhile, so only ours are compared).
    let ours = |set: &std::collections::BTreeSet<String>| {
        set.iter()
            .filter(|i| i.starts_with(&format!("{tag}-")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(ours(&root_interfaces()), ours(&root_before));

    drop(topo);
    assert_eq!(leftovers(&prefix, &tag), Vec::<String>::new());
    assert_eq!(ours(&root_interfaces()), ours(&root_before));
    eprintln!("topology {prefix}: made and removed {:?}", n.namespaces());
}

#[test]
fn a_panicking_test_body_still_removes_everything() {
    if !can_run("a_panicking_test_body_still_removes_everything") {
        return;
    }
    let prefix = unique_prefix();
    let p = prefix.clone();
    let tag = std::panic::catch_unwind(move || {
        let topo = Topology::up(&p).unwrap();
        let _standin = StandIn::start(&topo, 7000).unwrap();
        let tag = topo.names().tag.clone();
        std::panic::panic_any(tag);
    })
    .unwrap_err()
    .downcast::<String>()
    .unwrap();
    assert_eq!(leftovers(&prefix, &tag), Vec::<String>::new());
}

#[test]
fn up_rebuilds_a_half_made_topology_and_down_runs_twice() {
    if !can_run("up_rebuilds_a_half_made_topology_and_down_runs_twice") {
        return;
    }
    let prefix = unique_prefix();
    let first = Topology::up_on_subnet(&prefix, 201).unwrap();
    let hostb = first.host(Host::B).ns.clone();
    let tag = first.names().tag.clone();
    assert_eq!(Topology::status(&prefix).unwrap(), TopologyState::Up);
    sh("ip", &["netns", "delete", &hostb]);
    match Topology::status(&prefix).unwrap() {
        TopologyState::Partial { missing } => assert!(missing.contains(&hostb), "{missing:?}"),
        other => panic!("status {other:?} with host B's namespace gone"),
    }
    let second = Topology::up_on_subnet(&prefix, 201).unwrap();
    assert!(namespaces().contains(&hostb));
    let tap = &second.host(Host::B).tap;
    sh("ip", &["-n", &hostb, "link", "show", tap]);
    // Both guards remove the same topology: the second `down` finds
    // nothing and succeeds.
    first.down().unwrap();
    second.down().unwrap();
    Topology::down_prefix(&prefix).unwrap();
    assert_eq!(Topology::status(&prefix).unwrap(), TopologyState::Down);
    assert_eq!(leftovers(&prefix, &tag), Vec::<String>::new());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    // Other tests run beside this one: look only at names it could make.
    let mine = || {
        namespaces()
            .into_iter()
            .filter(|n| {
                n.starts_with("netlab-bad") || n.starts_with("Caps") || n.starts_with("waytoolong")
            })
            .collect::<Vec<_>>()
    };
    let before = mine();
    for bad in ["", "Caps", "a/b", "-x", "waytoolongforaprefix-0123456789"] {
        assert!(
            matches!(Topology::up(bad), Err(NetlabError::BadPrefix { .. })),
            "{bad}"
        );
    }
    assert!(matches!(
        Topology::up_on_subnet("netlab-bad", 300),
        Err(NetlabError::BadSubnetIndex(300))
    ));
    assert_eq!(mine(), before);
}

#[test]
fn two_topologies_coexist_and_each_carries_its_own_traffic() {
    if !can_run("two_topologies_coexist_and_each_carries_its_own_traffic") {
        return;
    }
    let (p1, p2) = (unique_prefix(), unique_prefix());
    // Built at the same time, as two tests running side by side would.
    let (t1, t2) = std::thread::scope(|s| {
        let a = s.spawn(|| Topology::up(&p1).unwrap());
        let b = s.spawn(|| Topology::up(&p2).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(t1.names().tag, t2.names().tag);
    let s1 = StandIn::start(&t1, 7001).unwrap();
    let s2 = StandIn::start(&t2, 7001).unwrap();
    let cfg = ProbeConfig::default;
    let pr1 = Probe::start_on(&t1, 7001, cfg()).unwrap();
    let pr2 = Probe::start_on(&t2, 7001, cfg()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (r1, r2) = (pr1.stop(), pr2.stop());
    eprint!("{r1}{r2}");
    for r in [&r1, &r2] {
        let tcp = r.tcp.as_ref().unwrap();
        let udp = r.udp.as_ref().unwrap();
        assert!(tcp.requests_sent > 100, "{r}");
        assert_eq!(tcp.replies_missing, 0, "{r}");
        assert!(tcp.connection_kept, "{r}");
        assert_eq!(udp.lost, 0, "{r}");
    }
    // Each stand-in served exactly its own probe.
    assert_eq!(
        s1.counters().tcp_replies,
        r1.tcp.as_ref().unwrap().replies_received
    );
    assert_eq!(
        s2.counters().tcp_replies,
        r2.tcp.as_ref().unwrap().replies_received
    );
    let (tag1, tag2) = (t1.names().tag.clone(), t2.names().tag.clone());
    drop((s1, s2, t1, t2));
    assert!(leftovers(&p1, &tag1).is_empty() && leftovers(&p2, &tag2).is_empty());
}
