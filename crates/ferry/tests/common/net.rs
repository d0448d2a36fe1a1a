//! The network tests' shared wiring: the netlab topology's skip check,
//! the `--net` flags for hosts A and B, a `ferry run --net` source with an
//! API socket, a client that must be answered, the migrate-then-verify
//! sequence to a host's tap, the long probe and its no-loss verdict, and
//! the lock that keeps one networked VM at a time in a test binary.

use std::time::Duration;

use ferry_netlab::{Host, Probe, ProbeConfig, ProbeReport, Topology};
use ferry_testguest::console::{parse_line, Heartbeat, Line};
use serde_json::Value;

use super::migrations::{assert_committed, finish_migrate, source_handed_over};
use super::{
    kvm_or_skip, migration_destination, start_migrate, verify_arrival, wait_for_socket, FerryProc,
    Stream, TempDir,
};

/// The guest's TCP and UDP echo port.
pub const PORT: u16 = 7000;
/// The guest card's MAC (locally administered).
pub const MAC: &str = "02:46:52:00:08:02";

/// False (after a loud SKIPPED line) without root, netns tools or /dev/kvm.
pub fn can_run(test: &str) -> bool {
    if let Some(why) = Topology::skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        println!("SKIPPED {test}: {why}");
        return false;
    }
    kvm_or_skip(test)
}

/// `--net` for `ferry run` on `host`, with the test's MAC.
pub fn net_flag(topo: &Topology, host: Host) -> String {
    let h = topo.host(host);
    format!("tap={},netns={},mac={MAC}", h.tap, h.ns)
}

/// A dirtying workload plus the TCP/UDP echo on the topology's guest IP.
pub fn workload(topo: &Topology) -> String {
    format!("dirty:64:100+net:{}/24:{PORT}", topo.guest_ip())
}

/// `ferry run --net` on host A with an API socket, READY.
pub fn net_source(dir: &TempDir, topo: &Topology) -> (FerryProc, String) {
    net_source_running(dir, topo, &workload(topo))
}

/// `ferry run --net` on host A running `wl` (which must serve the echo on
/// the topology's guest IP), with an API socket, READY.
pub fn net_source_running(dir: &TempDir, topo: &Topology, wl: &str) -> (FerryProc, String) {
    let socket = dir.path("A.sock");
    let net = net_flag(topo, Host::A);
    let mut vm = FerryProc::spawn(
        "A",
        &[
            "run",
            "--mem",
            "512M",
            "--workload",
            wl,
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
pub fn client_is_answered(topo: &Topology, what: &str) {
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

/// One test at a time: the guest's UDP echo keeps 16 datagrams, so a VM
/// starved of CPU by a parallel test's VM for more than 16 ms drops probes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `--net` for `ferry receive` on `host`: the tap there (the MAC is the
/// VM's own).
pub fn receive_net_flag(topo: &Topology, host: Host) -> String {
    let h = topo.host(host);
    format!("tap={},netns={}", h.tap, h.ns)
}

/// A committed migration to a host's tap: the destination (`ferry receive
/// --net`, API socket DIR/NAME.sock), its port, and `ferry migrate`'s JSON
/// report.
pub struct Committed {
    pub dst: FerryProc,
    pub dst_socket: String,
    pub port: u16,
    pub report: Value,
}

/// `ferry receive --net` on `host`'s tap (named `name`, `receive_extra`
/// added to its flags), then `ferry migrate` of the VM at `socket` there
/// with `migrate_args`, waited for (60 s) and asserted committed.
pub fn migrate_committed(
    dir: &TempDir,
    topo: &Topology,
    socket: &str,
    host: Host,
    name: &str,
    migrate_args: &[&str],
    receive_extra: &[&str],
) -> Committed {
    let net = receive_net_flag(topo, host);
    let dst_socket = dir.path(&format!("{name}.sock"));
    let mut args = vec![
        "--net",
        &net,
        "--api",
        &dst_socket,
        "--duration",
        "300s",
        "--json",
    ];
    args.extend_from_slice(receive_extra);
    let (dst, port) = migration_destination(name, &args);
    let mut mig = start_migrate(&format!("migrate to {name}"), socket, port, migrate_args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(60));
    assert_committed(status, &report, &mig);
    Committed {
        dst,
        dst_socket,
        port,
        report,
    }
}

/// After [`migrate_committed`]: the source `src` handed over and the guest
/// verified its memory on the destination (30 s); returns the
/// destination's first heartbeat.
pub fn arrived(src: &mut FerryProc, committed: &mut Committed) -> Heartbeat {
    let last = source_handed_over(src, committed.port);
    let (first, _) = verify_arrival(&mut committed.dst, &last, Duration::from_secs(30));
    first
}

/// [`migrate_committed`] then [`arrived`].
pub fn migrate_verified(
    dir: &TempDir,
    topo: &Topology,
    src: &mut FerryProc,
    socket: &str,
    host: Host,
    name: &str,
    migrate_args: &[&str],
) -> (Committed, Heartbeat) {
    let mut committed = migrate_committed(dir, topo, socket, host, name, migrate_args, &[]);
    let first = arrived(src, &mut committed);
    (committed, first)
}

/// The client's probe over one connection for the whole test (60 s at
/// most).
pub fn long_probe(topo: &Topology) -> Probe {
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
pub fn assert_kept_without_loss(test: &str, report: &ProbeReport, min_requests: u64) {
    eprint!("{test}: {report}");
    let lost = report.losses(min_requests);
    assert!(lost.is_empty(), "{test}: {}\n{report}", lost.join(", "));
}
