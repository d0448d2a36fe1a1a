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

use common::migrations::{assert_committed, finish_migrate, source_handed_over, stop_destination};
use common::{
    ferry, kvm_or_skip, migration_destination, snapshot, start_migrate, verify_arrival,
    wait_for_socket, FerryProc, Stream, TempDir,
};
use ferry_netlab::{FdbPlace, Host, MacAddr, Probe, ProbeConfig, Topology};
use ferry_testguest::console::{parse_line, Line, NetCounters};

const PORT: u16 = 7000;
const MAC: &str = "02:46:52:00:08:02";

fn can_run(test: &str) -> bool {
    if let Some(why) = Topology::skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        println!("SKIPPED {test}: {why}");
        return false;
    }
    kvm_or_skip(test)
}

fn net_flag(topo: &Topology, host: Host) -> String {
    let h = topo.host(host);
    format!("tap={},netns={},mac={MAC}", h.tap, h.ns)
}

fn workload(topo: &Topology) -> String {
    format!("dirty:64:100+net:{}/24:{PORT}", topo.guest_ip())
}

/// `ferry run --net` on host A with an API socket, READY.
fn net_source(dir: &TempDir, topo: &Topology) -> (FerryProc, String) {
    let socket = dir.path("A.sock");
    let net = net_flag(topo, Host::A);
    let wl = workload(topo);
    let mut vm = FerryProc::spawn(
        "A",
        &[
            "run",
            "--mem",
            "512M",
            "--workload",
            &wl,
            "--net",
            &net,
            "--api",
            &socket,
            "--duration",
            "300s",
        ],
    );
    vm.wait_line(Duration::from_secs(60), "READY", |s, text| {
        (s == Stream::Out && matches!(parse_line(text), Line::Ready(_))).then_some(())
    });
    wait_for_socket(&socket);
    (vm, socket)
}

/// One second of 1 ms TCP requests and UDP probes from the client on a
/// new connection: every request answered, every probe echoed.
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
    eprintln!(
        "{what}: TCP {} sent, {} replies, {} resets; UDP {} sent, {} echoed",
        tcp.requests_sent, tcp.replies_received, tcp.resets, udp.probes_sent, udp.echoed
    );
    assert!(tcp.requests_sent >= 200, "{what}: {report:?}");
    assert_eq!(tcp.replies_missing, 0, "{what}: {report:?}");
    assert_eq!(tcp.resets, 0, "{what}: {report:?}");
    assert!(udp.probes_sent >= 200, "{what}: {report:?}");
    assert_eq!(udp.lost, 0, "{what}: {report:?}");
}

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

/// One test at a time: the guest's UDP echo keeps 16 datagrams, so a VM
/// starved of CPU by a parallel test's VM for more than 16 ms drops probes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
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

    let dst_socket = dir.path("B.sock");
    let net_b = {
        let h = topo.host(Host::B);
        format!("tap={},netns={}", h.tap, h.ns)
    };
    let (mut dst, port) = migration_destination(
        "B",
        &[
            "--net",
            &net_b,
            "--api",
            &dst_socket,
            "--duration",
            "300s",
            "--json",
        ],
    );
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--mode", "precopy", "--downtime", "10ms", "--json"],
    );
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(60));
    assert_committed(status, &report, &mig);
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(30));
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
