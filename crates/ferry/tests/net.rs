//! The VM's network card through the command line, on real KVM and real
//! taps in the netlab topology (two tiers of bridges, hosts A and B, a
//! client): `ferry run --net` serves the guest's TCP and UDP echoes to the
//! client; `ferry snapshot` + `ferry restore --net` keeps them answering;
//! a pre-copy `ferry migrate` from host A's tap to host B's (`ferry
//! receive --net`) arrives verified, and a new connection from the client
//! reaches the guest on B (its MAC announced there); and bad input is
//! refused with a clear error before anything changes. Without root or
//! /dev/kvm each test says SKIPPED and returns.

mod common;

use std::time::Duration;

use common::migrations::stop_destination;
use common::net::{
    assert_kept_without_loss, can_run, client_is_answered, long_probe, migrate_verified, net_flag,
    net_source, serial, Committed, MAC,
};
use common::{
    ferry, migration_destination, snapshot, start_migrate, verify_arrival, FerryProc, Stream,
    TempDir,
};
use ferry_netlab::{FdbPlace, Host, MacAddr, Topology};
use ferry_testguest::console::NetCounters;

/// The guest's network counters once they show at least `replies` TCP
/// replies (heartbeats queued before are read on the way; 50 at most).
fn counters_reaching(vm: &mut FerryProc, replies: u64) -> NetCounters {
    let mut last = None;
    for _ in 0..50 {
        vm.next_heartbeat(Duration::from_secs(5));
        let c = vm
            .out
            .iter()
            .rev()
            .find_map(|l| NetCounters::from_heartbeat(l))
            .expect("heartbeats with network counters");
        if c.tcp_replies >= replies {
            return c;
        }
        last = Some(c);
    }
    panic!("the guest's counters never reached {replies} TCP replies: {last:?}");
}

#[test]
fn run_snapshot_restore_with_a_card_keeps_answering() {
    let _serial = serial();
    let test = "run_snapshot_restore_with_a_card_keeps_answering";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnsnap", 81).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    client_is_answered(&topo, "ferry run");
    let counters = counters_reaching(&mut src, 200);
    assert!(
        counters.tcp_replies >= 200 && counters.udp_echoes >= 200,
        "{counters:?}"
    );
    assert_eq!(counters.net_err, 0, "{counters:?}");

    let file = dir.path("vm.snap");
    let out = snapshot(&socket, &file, &["--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = src.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", src.transcript());
    let last = src.heartbeats().last().cloned().unwrap();

    // Without --net the snapshot's card has nowhere to go.
    let out = ferry().args(["restore", &file]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("virtio-net card") && stderr.contains("--net"),
        "{stderr}"
    );

    let net = net_flag(&topo, Host::A);
    let mut restored = FerryProc::spawn(
        "restored",
        &["restore", &file, "--net", &net, "--duration", "300s"],
    );
    let (first, _) = verify_arrival(&mut restored, &last, Duration::from_secs(30));
    assert_eq!(first.seq, last.seq + 1);
    client_is_answered(&topo, "ferry restore");
    restored.kill();
    topo.down().unwrap();
}

#[test]
fn precopy_to_host_b_arrives_verified_and_answers_there() {
    let _serial = serial();
    let test = "precopy_to_host_b_arrives_verified_and_answers_there";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnmig", 82).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    client_is_answered(&topo, "on host A");
    let mac: MacAddr = MAC.parse().unwrap();
    assert_eq!(topo.fdb_place(mac).unwrap(), Some(FdbPlace::HostA));

    let (Committed { mut dst, .. }, _) = migrate_verified(
        &dir,
        &topo,
        &mut src,
        &socket,
        Host::B,
        "B",
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
    );
    let prefix = "ferry: announced the VM's MAC at ";
    let seen = dst
        .err
        .iter()
        .find_map(|l| l.strip_prefix(prefix).map(str::to_owned));
    let announced = match seen {
        Some(text) => text,
        None => dst.wait_line(Duration::from_secs(5), "the announce times", |s, text| {
            (s == Stream::Err)
                .then(|| text.strip_prefix(prefix))?
                .map(str::to_owned)
        }),
    };
    eprintln!("{test}: announced at {announced}");
    assert_eq!(
        topo.fdb_place(mac).unwrap(),
        Some(FdbPlace::HostB),
        "the switch learnt the VM's new place from the announce"
    );
    client_is_answered(&topo, "on host B");
    stop_destination(&mut dst);
    topo.down().unwrap();
}

#[test]
fn a_destination_without_a_network_refuses_before_any_page_moves() {
    let _serial = serial();
    let test = "a_destination_without_a_network_refuses_before_any_page_moves";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnref", 83).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    for (name, extra) in [
        ("no-net", vec![]),
        // A tap that does not exist on B.
        (
            "no-tap",
            vec![
                "--net".to_string(),
                format!("tap=fnnope0,netns={}", topo.host(Host::B).ns),
            ],
        ),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (mut dst, port) = migration_destination(name, &extra);
        let mut mig = start_migrate(name, &socket, port, &["--mode", "precopy"]);
        let status = mig.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{}", mig.transcript());
        let reason = mig
            .err
            .iter()
            .find_map(|l| l.strip_prefix("ferry: migration failed: "))
            .unwrap_or_else(|| panic!("no failure line\n{}", mig.transcript()))
            .to_owned();
        eprintln!("{test} ({name}): {reason}");
        assert!(
            reason.contains("virtio-net") || reason.contains("fnnope0"),
            "{name}: the reason must name the network: {reason}"
        );
        assert!(
            reason.ends_with("; the VM is running on the source"),
            "{reason}"
        );
        let status = dst.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{}", dst.transcript());
        assert!(
            dst.heartbeats().is_empty(),
            "no VM may run on the destination"
        );
    }
    // Still running and answering on A.
    src.next_heartbeat(Duration::from_secs(5));
    client_is_answered(&topo, "still on host A");
    src.kill();
    topo.down().unwrap();
}

#[test]
fn bad_net_flags_are_refused_with_a_reason() {
    let _serial = serial();
    let test = "bad_net_flags_are_refused_with_a_reason";
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--net", "tap=x,mac=zz:00:00:00:00:01"],
            "is not a MAC address",
        ),
        (&["run", "--net", "netns=a"], "needs tap=NAME"),
        (
            &["run", "--net", "tap=x,mac=01:00:00:00:00:01"],
            "multicast",
        ),
        (
            &["run", "--workload", "idle+net:10.77.1.2/24:7000"],
            "give --net tap=NAME",
        ),
    ];
    for (args, want) in cases {
        let out = ferry()
            .args(*args)
            .arg("--duration")
            .arg("1s")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnbad", 84).expect("topology");
    let ns = topo.host(Host::A).ns.clone();
    let out = ferry()
        .args([
            "run",
            "--mem",
            "64M",
            "--net",
            &format!("tap=fnnope0,netns={ns}"),
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("fnnope0"), "{stderr}");
    // A tap in use: the first VM holds it.
    let dir = TempDir::new(test);
    let (mut src, _socket) = net_source(&dir, &topo);
    let out = ferry()
        .args([
            "run",
            "--mem",
            "64M",
            "--net",
            &net_flag(&topo, Host::A),
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("busy"), "{stderr}");
    src.kill();
    topo.down().unwrap();
}

#[test]
fn a_tcp_connection_survives_a_precopy_migration_without_loss() {
    let _serial = serial();
    let test = "a_tcp_connection_survives_a_precopy_migration_without_loss";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fnkeep", 85).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    let probe = long_probe(&topo);
    std::thread::sleep(Duration::from_millis(500));
    let (
        Committed {
            mut dst, report, ..
        },
        first,
    ) = migrate_verified(
        &dir,
        &topo,
        &mut src,
        &socket,
        Host::B,
        "B",
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
    );
    // Traffic goes on for a while on host B over the same connection.
    std::thread::sleep(Duration::from_millis(1000));
    let probe_report = probe.stop();
    let handover = dst
        .err
        .iter()
        .find(|l| l.starts_with("ferry: network handover: "))
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "{test}: guest stall on arrival {} us; source forwarded {}; {handover}",
        first.stall_us, report["network"]
    );
    assert!(!handover.is_empty(), "{}", dst.transcript());
    assert_kept_without_loss(test, &probe_report, 1000);
    stop_destination(&mut dst);
    topo.down().unwrap();
}
