//! Real KVM, real taps: the test guest's own virtio-net driver finds
//! Ferry's card in virtio-mmio slot 0, and a client in the topology's
//! client namespace reaches the guest's TCP and UDP echoes through host
//! A's tap and two tiers of bridges. A snapshot and restore (the card's
//! queues continue where they were, no driver reset) keeps it answering.
//! Without root or /dev/kvm each test says SKIPPED and returns.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ferry_netlab::{Host, MacAddr, Probe, ProbeConfig, Topology};
use ferry_testguest::console::{parse_line, Line, NetCounters, NetUp};
use ferry_testguest::workload::Workload;
use ferry_vmm::devices::net::{NetConfig, NetStats};
use ferry_vmm::state::StateRecord;
use ferry_vmm::{GuestImage, Vm, VmConfig, VmError, VmEvent};
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 256 << 20;
const PORT: u16 = 7000;
const MAC: MacAddr = MacAddr([0x02, 0x46, 0x52, 0x00, 0x07, 0x02]);

/// One test at a time: the guest's UDP echo keeps 16 datagrams, so a VM
/// starved of CPU by a parallel test for more than 16 ms drops probes.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn can_run(test: &str) -> bool {
    if let Some(why) = Topology::skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        return false;
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable here; this test needs real KVM");
    }
    kvm
}

fn net_config(topo: &Topology, host: Host) -> NetConfig {
    let h = topo.host(host);
    NetConfig {
        tap: h.tap.clone(),
        netns: Some(h.ns.clone()),
        mac: MAC,
    }
}

fn boot(topo: &Topology, host: Host) -> Vm {
    let workload: Workload = "dirty:32:50".parse().unwrap();
    let cmdline = format!(
        "{} net={}/24:{PORT}",
        ferry_testguest::guest_cmdline(&workload, 1, None),
        topo.guest_ip()
    );
    Vm::start(VmConfig {
        mem_bytes: MEM,
        vcpus: 1,
        image: GuestImage::Bytes(ferry_testguest::GUEST_ELF.into()),
        cmdline,
        prealloc: false,
        net: Some(net_config(topo, host)),
        block: None,
    })
    .expect("the VM with a network card starts")
}

/// Console lines until `until` matches one (returned) or `timeout`.
fn wait_for(
    events: &Receiver<VmEvent>,
    timeout: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(50)) {
            Ok(VmEvent::Console(line)) => {
                if until(&line.text) {
                    return line.text;
                }
                seen.push(line.text);
            }
            Ok(VmEvent::Stopped(reason)) => panic!("guest stopped: {reason:?}; saw {seen:#?}"),
            Err(_) => {}
        }
    }
    panic!("timed out; the guest printed {seen:#?}");
}

/// The network counters of the next heartbeat printed from now on
/// (older queued lines are skipped; every skipped heartbeat's `err` is
/// checked too).
fn next_counters(events: &Receiver<VmEvent>) -> NetCounters {
    while let Ok(event) = events.try_recv() {
        match event {
            VmEvent::Console(line) => {
                if let Line::Heartbeat(hb) = parse_line(&line.text) {
                    assert_eq!(hb.err, 0, "the guest found bad pages: {}", line.text);
                }
            }
            VmEvent::Stopped(reason) => panic!("guest stopped: {reason:?}"),
        }
    }
    let line = wait_for(events, Duration::from_secs(5), |l| {
        NetCounters::from_heartbeat(l).is_some()
    });
    if let Line::Heartbeat(hb) = parse_line(&line) {
        assert_eq!(hb.err, 0, "the guest found bad pages: {line}");
    }
    NetCounters::from_heartbeat(&line).unwrap()
}

/// One second of 1 ms TCP requests and UDP probes from the client; every
/// request answered, every probe echoed.
fn probe_answers(topo: &Topology, what: &str) {
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
        "{what}: TCP {} sent, {} replies, longest rtt {:?} us; UDP {} sent, {} echoed",
        tcp.requests_sent, tcp.replies_received, tcp.longest_rtt_us, udp.probes_sent, udp.echoed
    );
    assert!(tcp.requests_sent >= 200, "{what}: {report:?}");
    assert_eq!(tcp.replies_missing, 0, "{what}: {report:?}");
    assert_eq!(tcp.resets, 0, "{what}: {report:?}");
    assert!(tcp.connection_kept, "{what}: {report:?}");
    assert!(udp.probes_sent >= 200, "{what}: {report:?}");
    assert_eq!(udp.lost, 0, "{what}: {report:?}");
}

#[test]
fn guest_echoes_over_the_tap_and_keeps_answering_after_a_restore() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let test = "guest_echoes_over_the_tap_and_keeps_answering_after_a_restore";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fvnet1", 71).expect("topology");
    let mut vm = boot(&topo, Host::A);
    let events = vm.take_events().unwrap();
    let net_line = wait_for(&events, Duration::from_secs(30), |l| l.starts_with("NET "));
    let up = NetUp::parse(&net_line).unwrap();
    assert_eq!(
        (up.slot, up.addr, up.version),
        (0, 0xfeb0_0000, 2),
        "{net_line}"
    );
    assert_eq!(up.mac, MAC.to_string());
    wait_for(&events, Duration::from_secs(30), |l| l.starts_with("READY"));

    let before = next_counters(&events);
    probe_answers(&topo, "boot");
    let after = next_counters(&events);
    assert!(after.tcp_replies >= before.tcp_replies + 200, "{after:?}");
    assert!(after.udp_echoes >= before.udp_echoes + 200, "{after:?}");
    assert_eq!(after.net_err, 0, "{after:?}");
    let handle = vm.net().unwrap();
    let stats: NetStats = handle.stats();
    assert!(
        stats.rx_frames >= 400 && stats.tx_frames >= 400,
        "{stats:?}"
    );
    assert_eq!(
        handle.guest_ip(),
        Some(topo.guest_ip()),
        "learnt from its frames"
    );

    // The tap is taken while this VM holds it.
    let err = Vm::start(VmConfig {
        net: Some(net_config(&topo, Host::A)),
        block: None,
        ..config_without_guest()
    })
    .err()
    .expect("a tap in use is refused");
    assert!(matches!(err, VmError::Net(_)), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");

    // Snapshot: state record and memory, then the VM is gone.
    vm.pause().unwrap();
    let record = vm.save_state().unwrap();
    assert!(record.net.is_some());
    let bytes = record.encode();
    let mut ram = vec![0u8; MEM as usize];
    vm.memory().read_slice(&mut ram, GuestAddress(0)).unwrap();
    vm.stop();
    drop(vm);
    // A handle keeps the tap open; the restored VM needs it.
    drop(handle);

    let record = StateRecord::decode(&bytes).unwrap();
    // Without a tap the saved card cannot come back.
    let err = Vm::restore(&record, false, |m| m.write_slice(&ram, GuestAddress(0)))
        .err()
        .expect("a VM with a card needs a tap");
    assert!(matches!(err, VmError::NetMissing { .. }), "{err}");

    let mut vm = Vm::restore_with_devices(
        &record,
        false,
        Some(net_config(&topo, Host::A)),
        None,
        |m| m.write_slice(&ram, GuestAddress(0)),
    )
    .expect("restore with the card");
    let events = vm.take_events().unwrap();
    let before = next_counters(&events);
    probe_answers(&topo, "restored");
    let after = next_counters(&events);
    assert!(after.tcp_replies >= before.tcp_replies + 200, "{after:?}");
    assert_eq!(after.net_err, 0, "{after:?}");
    assert_eq!(vm.net().unwrap().guest_ip(), Some(topo.guest_ip()));
    vm.stop();
    drop(vm);
    topo.down().unwrap();
}

fn config_without_guest() -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        image: GuestImage::Bytes(ferry_testguest::GUEST_ELF.into()),
        cmdline: String::new(),
        prealloc: false,
        net: None,
        block: None,
    }
}

#[test]
fn a_missing_tap_and_a_multicast_mac_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let test = "a_missing_tap_and_a_multicast_mac_are_refused";
    if !can_run(test) {
        return;
    }
    let topo = Topology::up_on_subnet("fvnet2", 72).expect("topology");
    let ns = topo.host(Host::A).ns.clone();
    let err = Vm::start(VmConfig {
        net: Some(NetConfig {
            tap: "fvnope0".into(),
            netns: Some(ns.clone()),
            mac: MAC,
        }),
        ..config_without_guest()
    })
    .err()
    .expect("a missing tap is refused");
    assert!(err.to_string().contains("fvnope0"), "{err}");
    // Nothing was made in its place.
    let out = std::process::Command::new("ip")
        .args(["-n", &ns, "link", "show", "fvnope0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a tap was created");

    let err = Vm::start(VmConfig {
        net: Some(NetConfig {
            mac: MacAddr([0x03, 0, 0, 0, 0, 1]),
            ..net_config(&topo, Host::A)
        }),
        ..config_without_guest()
    })
    .err()
    .expect("a multicast MAC is refused");
    assert!(err.to_string().contains("unicast"), "{err}");
    topo.down().unwrap();
}
