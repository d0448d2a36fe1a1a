//! A VM's network card through the agent, on real KVM and real taps in
//! the netlab topology: host A's and host B's `ferryd` each name the
//! bridge of their host's namespace as network "prod" in host.toml; a VM
//! defined with `net = {network: "prod"}` gets a MAC recorded and a tap
//! of its own attached to that bridge, serves TCP to the client, migrates
//! A to B over the agents' mutual TLS while the client probes one TCP
//! connection every 1 ms (kept, nothing lost), is re-adopted by a
//! restarted ferryd with its tap (which removes any tap of its own that
//! nothing names), and its taps go when it leaves a host
//! or is deleted. Bad input (an unknown network, a malformed MAC, a
//! destination without the network) is refused with a reason and
//! changes nothing. Without root, netns tools or /dev/kvm the tests that
//! need them say SKIPPED.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::peers::{
    agent_with, cancel_and_wait, host, incoming_ended, keep_peer_addr, migrate_verified, reserved,
    start, start_slow, wait_job, Fleet,
};
use common::{kvm_or_skip, Agent};
use ferry_netlab::{FdbPlace, Host, MacAddr, Probe, ProbeConfig, ProbeReport, Topology};
use serde_json::{json, Value};

const PORT: u16 = 7000;

/// Root, netns tools and /dev/kvm, or a loud SKIPPED.
fn can_run(test: &str) -> bool {
    if let Some(why) = Topology::skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        println!("SKIPPED {test}: {why}");
        return false;
    }
    kvm_or_skip(test)
}

/// host.toml's `[[network]] prod` on `host`'s bridge, and `more`.
fn networks(topo: &Topology, host: Host, more: &str) -> String {
    let h = topo.host(host);
    format!(
        "[[network]]\nname = \"prod\"\nbridge = \"{}\"\nnetns = \"{}\"\n{more}",
        h.bridge, h.ns
    )
}

/// The agent's taps (`fy…`) in namespace `ns`, each with its bridge.
fn taps_in(ns: &str) -> Vec<(String, Option<String>)> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .expect("ip");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?.to_owned();
            if !name.starts_with(ferry_agent::network::TAP_PREFIX) {
                return None;
            }
            let mut words = l.split_whitespace();
            let master = words
                .by_ref()
                .find(|w| *w == "master")
                .and_then(|_| words.next())
                .map(str::to_owned);
            Some((name, master))
        })
        .collect()
}

fn run_ip(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A tap in `ns` on `bridge`, as an agent (marked `alias`) or an operator
/// would make it; the namespace's removal takes it.
fn add_tap(ns: &str, name: &str, alias: Option<&str>, bridge: &str) {
    run_ip(ns, &["tuntap", "add", "dev", name, "mode", "tap"]);
    run_ip(ns, &["link", "set", "dev", name, "master", bridge]);
    if let Some(a) = alias {
        run_ip(ns, &["link", "set", "dev", name, "alias", a]);
    }
}

/// Waits (bounded) until namespace `ns` has no tap called `tap`.
fn wait_tap_gone(ns: &str, tap: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while taps_in(ns).iter().any(|(n, _)| n == tap) {
        assert!(
            Instant::now() < deadline,
            "tap {tap} still in {ns} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `POST /v1/vms` with a card; the reply.
fn create_with_card(
    agent: &Agent,
    id: &str,
    workload: &str,
    net: Value,
) -> ferry_agent::client::Reply {
    agent.post(
        "/v1/vms",
        Some(json!({
            "id": id,
            "definition": {"mem_bytes": 512u64 << 20, "workload": workload, "net": net},
            "policy": {"downtime_ms": 10.0}
        })),
    )
}

/// One second of 1 ms TCP requests and UDP probes on a new connection:
/// every one answered.
fn client_is_answered(topo: &Topology, what: &str) {
    let probe = Probe::start_on(
        topo,
        PORT,
        ProbeConfig {
            max_duration: Duration::from_secs(5),
            ..ProbeConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: the client cannot connect: {e}"));
    std::thread::sleep(Duration::from_secs(1));
    let report = probe.stop();
    let tcp = report.tcp.as_ref().unwrap();
    let udp = report.udp.as_ref().unwrap();
    assert!(tcp.requests_sent >= 200, "{what}: {report:?}");
    assert_eq!(tcp.replies_missing, 0, "{what}: {report:?}");
    assert_eq!(tcp.resets, 0, "{what}: {report:?}");
    assert_eq!(udp.lost, 0, "{what}: {report:?}");
}

fn assert_kept_without_loss(test: &str, report: &ProbeReport) {
    eprint!("{test}: {report}");
    let lost = report.losses(1000);
    assert!(lost.is_empty(), "{test}: {}\n{report}", lost.join(", "));
}

/// Heartbeats on `agent` go on past `seq` by `more`, each without error.
fn verified_after(agent: &Agent, vm: &str, seq: u64, more: u64) -> Value {
    let hb = agent.heartbeat_after(vm, seq + more, Duration::from_secs(30));
    assert_eq!(hb["err"], 0, "bad pages: {hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    hb
}

#[test]
fn a_vm_with_a_card_migrates_between_agents_and_keeps_its_tcp_connection() {
    let test = "a_vm_with_a_card_migrates_between_agents_and_keeps_its_tcp_connection";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fanet", 92).expect("topology");
    let (ns_a, ns_b) = (topo.host(Host::A).ns.clone(), topo.host(Host::B).ns.clone());
    let fleet = Fleet::new("net");
    let a = agent_with("neta", &fleet, "2G", false, &networks(&topo, Host::A, ""));
    let mut b = agent_with("netb", &fleet, "2G", false, &networks(&topo, Host::B, ""));

    let workload = format!("dirty:64:100+net:{}/24:{PORT}", topo.guest_ip());
    let r = create_with_card(&a, "web", &workload, json!({"network": "prod"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let mac = created["definition"]["net"]["mac"]
        .as_str()
        .expect("a generated MAC is recorded")
        .to_owned();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let tap_a = created["tap"]["name"].as_str().expect("a tap").to_owned();
    assert_eq!(
        taps_in(&ns_a),
        vec![(tap_a.clone(), Some(topo.host(Host::A).bridge.clone()))],
        "one tap on host A, attached to its bridge"
    );
    assert_eq!(taps_in(&ns_b), vec![]);
    a.heartbeat("web");
    client_is_answered(&topo, "on host A");
    let mac: MacAddr = mac.parse().unwrap();
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostA));

    let probe = Probe::start_on(
        &topo,
        PORT,
        ProbeConfig {
            max_duration: Duration::from_secs(60),
            ..ProbeConfig::default()
        },
    )
    .expect("the client connects on host A");
    std::thread::sleep(Duration::from_millis(500));
    let job = migrate_verified(&a, &b, "web");
    let report = &job["report"];
    eprintln!(
        "{test}: transport {}; blackout {} ms; network {}",
        job["transport"], report["blackout"]["host_downtime_ms"], report["network"]
    );
    let on_b = b.show("web");
    assert_eq!(on_b["state"], "running", "{on_b}");
    assert_eq!(on_b["definition"]["net"]["mac"], mac.to_string());
    let tap_b = on_b["tap"]["name"].as_str().expect("a tap on B").to_owned();
    assert_eq!(
        taps_in(&ns_b),
        vec![(tap_b.clone(), Some(topo.host(Host::B).bridge.clone()))]
    );
    let hb = verified_after(&b, "web", 0, 0);
    verified_after(&b, "web", hb["seq"].as_u64().unwrap(), 5);
    std::thread::sleep(Duration::from_millis(1000));
    let probe_report = probe.stop();
    assert_kept_without_loss(test, &probe_report);
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostB));
    // The VM has left A: its tap there goes once the old VMM is done.
    wait_tap_gone(&ns_a, &tap_a, Duration::from_secs(70));

    // A restarted ferryd re-adopts the VM with its tap, and removes the
    // taps its host's agent made that nothing names (an agent killed
    // between making a tap and recording it), and only those.
    let pid = on_b["pid"].clone();
    assert!(b.terminate().success());
    let bridge_b = topo.host(Host::B).bridge.clone();
    let own = ferry_agent::network::owner_alias(&host(&b));
    add_tap(&ns_b, "fyorphan1", Some(&own), &bridge_b);
    add_tap(&ns_b, "fyforeign1", Some("ferry:elsewhere"), &bridge_b);
    add_tap(&ns_b, "fyplain1", None, &bridge_b);
    b.start();
    let again = b.show("web");
    assert_eq!(again["state"], "running", "{again}");
    assert_eq!(again["pid"], pid, "never restarted");
    assert_eq!(again["tap"]["name"], tap_b.as_str());
    let mut left: Vec<String> = taps_in(&ns_b).into_iter().map(|(n, _)| n).collect();
    left.sort();
    let mut expected = vec![tap_b.clone(), "fyforeign1".into(), "fyplain1".into()];
    expected.sort();
    assert_eq!(left, expected, "only the orphan of this host's agent went");
    for other in ["fyforeign1", "fyplain1"] {
        run_ip(&ns_b, &["link", "del", "dev", other]);
    }
    client_is_answered(&topo, "on host B after ferryd restarted");

    // Deleted: its tap goes with it.
    let r = b.delete("/v1/vms/web");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(taps_in(&ns_b), vec![]);
    assert_eq!(taps_in(&ns_a), vec![]);
    drop((a, b));
    topo.down().unwrap();
}

#[test]
fn a_destination_without_the_network_refuses_before_any_page_moves() {
    let test = "a_destination_without_the_network_refuses_before_any_page_moves";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("falone", 93).expect("topology");
    let (ns_a, ns_b) = (topo.host(Host::A).ns.clone(), topo.host(Host::B).ns.clone());
    let fleet = Fleet::new("alone");
    // Only A has "lab".
    let lab = format!(
        "[[network]]\nname = \"lab\"\nbridge = \"{}\"\nnetns = \"{ns_a}\"\n",
        topo.host(Host::A).bridge
    );
    let a = agent_with(
        "alonea",
        &fleet,
        "2G",
        false,
        &networks(&topo, Host::A, &lab),
    );
    let b = agent_with("aloneb", &fleet, "2G", false, &networks(&topo, Host::B, ""));
    let r = create_with_card(
        &a,
        "lonely",
        "dirty:16:50",
        json!({"network": "lab", "mac": "52:54:00:00:10:01"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let pid = r.json()["pid"].clone();
    let before = a.heartbeat("lonely");

    let r = start(&a, "lonely", &b);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = wait_job(&a, &id, Duration::from_secs(60));
    let error = done["error"].as_str().unwrap_or_default();
    eprintln!("{test}: {error}");
    assert_eq!(done["phase"], "failed", "{done}");
    assert!(
        error.contains("refused to prepare") && error.contains("needs network \"lab\""),
        "{error}"
    );
    assert!(done["report"].is_null(), "no page moved: {done}");
    // Nothing changed: the VM runs on A, same process, still verified;
    // B has no VM, no receiver, no tap.
    let still = a.show("lonely");
    assert_eq!(still["state"], "running", "{still}");
    assert_eq!(still["pid"], pid);
    verified_after(&a, "lonely", before["seq"].as_u64().unwrap(), 3);
    assert_eq!(b.get("/v1/vms").json().as_array().map(Vec::len), Some(0));
    assert_eq!(taps_in(&ns_b), vec![]);
    assert_eq!(taps_in(&ns_a).len(), 1);
    let r = a.delete("/v1/vms/lonely");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(taps_in(&ns_a), vec![]);
    drop((a, b));
    topo.down().unwrap();
}

/// B's ferryd killed while a VM with a card arrives, and the migration
/// cancelled meanwhile: started again, B finds the receiver gone and
/// removes the tap it had made, with its reservation.
#[test]
fn a_destination_agent_killed_while_a_card_arrives_removes_its_tap_after_a_cancel() {
    let test = "a_destination_agent_killed_while_a_card_arrives_removes_its_tap_after_a_cancel";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fakill", 94).expect("topology");
    let (ns_a, ns_b) = (topo.host(Host::A).ns.clone(), topo.host(Host::B).ns.clone());
    let fleet = Fleet::new("nkill");
    let a = agent_with("nkilla", &fleet, "2G", false, &networks(&topo, Host::A, ""));
    let mut b = agent_with("nkillb", &fleet, "2G", false, &networks(&topo, Host::B, ""));
    keep_peer_addr(&b);
    let r = create_with_card(&a, "web", "dirty:64:100:256", json!({"network": "prod"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let seq = a.heartbeat("web")["seq"].as_u64().unwrap();
    // About 10 s of first pass: cancelled well before the end.
    let (id, incoming) = start_slow(&a, "web", &b, 32 << 20);
    let taps_b = taps_in(&ns_b);
    assert_eq!(taps_b.len(), 1, "B made one tap for the arriving VM");
    b.kill9_then_start(|| cancel_and_wait(&a, &id));
    let on_b = incoming_ended(&b, &incoming);
    assert_ne!(on_b["phase"], "committed", "{on_b}");
    wait_tap_gone(&ns_b, &taps_b[0].0, Duration::from_secs(30));
    assert_eq!(taps_in(&ns_b), vec![]);
    assert_eq!(reserved(&b, "ferryd_memory_reserved_bytes"), 0);
    assert_eq!(b.get("/v1/vms").json().as_array().map(Vec::len), Some(0));
    // The VM runs on A with its own tap, whole.
    assert_eq!(a.show("web")["state"], "running");
    verified_after(&a, "web", seq, 3);
    assert_eq!(taps_in(&ns_a).len(), 1);
    let r = a.delete("/v1/vms/web");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(taps_in(&ns_a), vec![]);
}

/// Needs neither root nor KVM: everything here is refused before a tap
/// or a VMM is made.
#[test]
fn bad_cards_are_refused_with_a_reason_and_change_nothing() {
    let net = "[[network]]\nname = \"prod\"\nbridge = \"fybr-none\"\n";
    let agent = Agent::with_extra("badnet", "1G", 2, None, net, |_| {});
    let mem = 64u64 << 20;
    let cases = [
        (
            json!({"mem_bytes": mem, "net": {"network": "nope"}}),
            400,
            "has no such network (it has: prod)",
        ),
        (
            json!({"mem_bytes": mem, "net": {"network": "prod", "mac": "zz:00:00:00:00:01"}}),
            400,
            "is not a MAC address",
        ),
        (
            json!({"mem_bytes": mem, "net": {"network": "prod", "mac": "52:54:00:00:01"}}),
            400,
            "is not a MAC address",
        ),
        (
            json!({"mem_bytes": mem, "net": {"network": "prod", "mac": "01:00:5e:00:00:01"}}),
            400,
            "multicast",
        ),
        (
            json!({"mem_bytes": mem, "net": {"network": "prod", "vlan": 3}}),
            400,
            "unknown field `vlan`",
        ),
        (
            json!({"mem_bytes": mem, "workload": "net:10.9.0.2/24:7000"}),
            400,
            "give the VM a card",
        ),
    ];
    for (definition, status, want) in cases {
        let r = agent.post(
            "/v1/vms",
            Some(json!({"id": "bad", "definition": definition})),
        );
        assert_eq!(r.status, status, "{definition}: {}", r.text());
        let reason = r.json()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains(want), "{definition}: {reason}");
    }
    assert_eq!(
        agent.get("/v1/vms").json().as_array().map(Vec::len),
        Some(0)
    );
    assert!(agent.get("/v1/vms/bad").status == 404);
}
