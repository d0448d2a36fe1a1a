//! The guest's network under QEMU: the same guest ELF finds QEMU microvm's
//! virtio-net-device in its virtio-mmio slots, drives it by polling from
//! ring 3, and serves the TCP echo (numbered replies) and the UDP echo
//! while its dirty workload keeps verifying memory.
//!
//! Each test makes its own network namespace with a tap in it (a guard
//! removes it, also when the test fails), runs QEMU inside it, and talks
//! to the guest from a client thread that joined the namespace. Addresses
//! exist only inside that namespace. Without root, /dev/kvm, `ip` or QEMU
//! the tests say `SKIPPED` loudly and return.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{run_to_exit, Qemu, QemuSpec, QEMU};
use ferry_testguest::console::{exit_code, parse_line, Heartbeat, Line, NetCounters, NetUp};

const GUEST_IP: &str = "10.99.0.2";
const HOST_CIDR: &str = "10.99.0.1/24";
const PORT: u16 = 7000;
const TAP: &str = "fngtap0";
const REQUESTS: u64 = 300;
const CONCURRENT: u64 = 4;
const CONCURRENT_REQUESTS: u64 = 50;
const RECONNECTS: u64 = 3;
const RECONNECT_REQUESTS: u64 = 10;
const UDP_PROBES: u64 = 100;
const INTERVAL: Duration = Duration::from_millis(1);

/// True when this machine can run the test; otherwise says why, loudly.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: not root: creating a network namespace and a tap needs root");
        return false;
    }
    if !common::kvm_or_skip(test) {
        return false;
    }
    for (tool, arg) in [("ip", "-V"), (QEMU, "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED {test}: `{tool}` is not installed (scripts/setup.sh installs QEMU; `ip` is Debian's iproute2)");
            return false;
        }
    }
    true
}

/// A network namespace with a tap whose host end has [`HOST_CIDR`];
/// deleted (tap and all) when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Netns {
        // The pid keeps parallel runs (and a crashed earlier run's
        // leftovers) apart; the tag keeps this file's tests apart.
        let name = format!("fng-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        // From here on, a failure below still removes the namespace.
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.name, "tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["-n", &ns.name, "addr", "add", HOST_CIDR, "dev", TAP]);
        ip(&["-n", &ns.name, "link", "set", TAP, "up"]);
        ns
    }

    /// Runs `f` on a thread that joined this namespace (threads it starts
    /// are in it too); the test's own thread stays where it is.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on an open namespace file changes only the
            // calling thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("WARNING: could not delete network namespace {}", self.name);
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn guest_addr() -> SocketAddr {
    SocketAddr::new(GUEST_IP.parse().unwrap(), PORT)
}

/// `n` requests on one connection at `INTERVAL`, each reply checked:
/// `i tag-i`. Returns the round trip of each.
fn tcp_exchange(tag: &str, n: u64) -> Result<Vec<Duration>, String> {
    let stream = TcpStream::connect_timeout(&guest_addr(), Duration::from_secs(5))
        .map_err(|e| format!("{tag}: connect: {e}"))?;
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut rtts = Vec::new();
    let start = Instant::now();
    let mut reply = String::new();
    for i in 1..=n {
        let sent = Instant::now();
        writer
            .write_all(format!("{tag}-{i}\n").as_bytes())
            .map_err(|e| format!("{tag}: send {i}: {e}"))?;
        reply.clear();
        reader
            .read_line(&mut reply)
            .map_err(|e| format!("{tag}: reply {i}: {e}"))?;
        rtts.push(sent.elapsed());
        if reply != format!("{i} {tag}-{i}\n") {
            return Err(format!("{tag}: request {i} got reply {reply:?}"));
        }
        // A fixed schedule: one request per INTERVAL from the start.
        let next = start + INTERVAL * (i as u32);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    writer.shutdown(Shutdown::Write).ok();
    // The guest closes its side once our FIN arrived: end of file.
    reply.clear();
    match reader.read_line(&mut reply) {
        Ok(0) => Ok(rtts),
        other => Err(format!("{tag}: after the last reply: {other:?} {reply:?}")),
    }
}

/// A line above the guest's 64-byte limit: the guest resets the
/// connection instead of answering.
fn overlong_line_resets() -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&guest_addr(), Duration::from_secs(5))
        .map_err(|e| format!("overlong: connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .write_all(&[b'x'; 100])
        .and_then(|()| stream.write_all(b"\n"))
        .map_err(|e| format!("overlong: send: {e}"))?;
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!(
            "overlong: expected a reset, got {other:?} {reply:?}"
        )),
    }
}

/// `n` UDP probes, each waited for; returns round trips and probes lost.
fn udp_exchange(n: u64) -> Result<(Vec<Duration>, u64), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let (mut rtts, mut lost) = (Vec::new(), 0);
    let mut buf = [0u8; 256];
    for i in 0..n {
        let probe = format!("probe {i}");
        let sent = Instant::now();
        socket
            .send_to(probe.as_bytes(), guest_addr())
            .map_err(|e| format!("udp send {i}: {e}"))?;
        match socket.recv_from(&mut buf) {
            Ok((len, from)) if from == guest_addr() && &buf[..len] == probe.as_bytes() => {
                rtts.push(sent.elapsed())
            }
            Ok((len, from)) => {
                return Err(format!(
                    "udp probe {i} answered by {from} with {:?}",
                    String::from_utf8_lossy(&buf[..len])
                ))
            }
            Err(_) => lost += 1,
        }
        thread::sleep(INTERVAL);
    }
    Ok((rtts, lost))
}

/// What the client saw.
struct ClientReport {
    rtts: Vec<Duration>,
    udp_rtts: Vec<Duration>,
    udp_lost: u64,
}

/// The whole exchange: one long connection, concurrent ones, one that
/// breaks the protocol, reconnects, then UDP.
fn client() -> Result<ClientReport, String> {
    let mut rtts = tcp_exchange("long", REQUESTS)?;
    let concurrent: Vec<_> = (0..CONCURRENT)
        .map(|k| thread::spawn(move || tcp_exchange(&format!("conc{k}"), CONCURRENT_REQUESTS)))
        .collect();
    for handle in concurrent {
        rtts.extend(handle.join().expect("client thread")?);
    }
    overlong_line_resets()?;
    for k in 0..RECONNECTS {
        rtts.extend(tcp_exchange(&format!("again{k}"), RECONNECT_REQUESTS)?);
    }
    let (udp_rtts, udp_lost) = udp_exchange(UDP_PROBES)?;
    Ok(ClientReport {
        rtts,
        udp_rtts,
        udp_lost,
    })
}

fn percentiles(label: &str, rtts: &mut [Duration]) -> Duration {
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{label}: {} round trips: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        rtts.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    at(0.5)
}

/// Boots the guest with a virtio-net-device on a tap (legacy or modern
/// virtio-mmio), runs the client against it and checks replies,
/// heartbeats and counters.
fn echo_while_dirty(test: &str, tag: &str, modern: bool, mac: &str) {
    if !can_run(test) {
        return;
    }
    let ns = Netns::create(tag);
    let append = format!("workload=dirty:32:50 net={GUEST_IP}/24:{PORT}");
    let mut extra: Vec<String> = [
        "-netdev",
        &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={mac}"),
    ]
    .map(String::from)
    .to_vec();
    if modern {
        extra.extend(["-global", "virtio-mmio.force-legacy=false"].map(String::from));
    }
    let mut qemu = Qemu::spawn(&QemuSpec {
        extra,
        wrapper: ["ip", "netns", "exec", &ns.name].map(String::from).to_vec(),
        ..QemuSpec::microvm(&append)
    });

    // Boot: the NET line, then READY.
    let mut net_up = None;
    let mut heartbeats: Vec<(Heartbeat, Option<NetCounters>)> = Vec::new();
    let on_line = |qemu: &Qemu, raw: &str, heartbeats: &mut Vec<_>| match parse_line(raw) {
        Line::Heartbeat(hb) => {
            assert_eq!(hb.err, 0, "bad pages; console:\n{}", qemu.console());
            let net = NetCounters::from_heartbeat(raw);
            assert!(net.is_some(), "HB without network fields: {raw}");
            heartbeats.push((hb, net));
        }
        Line::PageError(_) | Line::Exit(_) => {
            panic!("unexpected {raw:?}; console:\n{}", qemu.console())
        }
        _ => {}
    };
    let mut ready = false;
    while !ready {
        let raw = qemu
            .next_raw()
            .unwrap_or_else(|| panic!("QEMU stopped; console:\n{}", qemu.console()));
        if let Some(up) = NetUp::parse(&raw) {
            net_up = Some(up);
        }
        ready = matches!(parse_line(&raw), Line::Ready(_));
        on_line(&qemu, &raw, &mut heartbeats);
    }
    let up =
        net_up.unwrap_or_else(|| panic!("no NET line before READY; console:\n{}", qemu.console()));
    eprintln!(
        "NET: slot {} at {:#x}, virtio-mmio version {}, {} register reads in {} us",
        up.slot, up.addr, up.version, up.scan_reads, up.scan_us
    );
    assert_eq!(up.version, if modern { 2 } else { 1 }, "{up:?}");
    assert_eq!((up.mac.as_str(), up.port), (mac, u64::from(PORT)));
    assert_eq!(up.ip, format!("{GUEST_IP}/24"));
    let before = heartbeats.last().map(|(hb, _)| hb.ver).unwrap_or(0);

    // The exchange, while the console keeps being read.
    let client = ns.run(client);
    while !client.is_finished() {
        let raw = qemu
            .next_raw()
            .unwrap_or_else(|| panic!("QEMU stopped; console:\n{}", qemu.console()));
        on_line(&qemu, &raw, &mut heartbeats);
    }
    let mut report = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", qemu.console()));

    // The guest's counters catch up with the client within a heartbeat.
    let replies = REQUESTS + CONCURRENT * CONCURRENT_REQUESTS + RECONNECTS * RECONNECT_REQUESTS;
    // The overlong line's connection counts, and its reset is the one
    // error.
    let conns = 1 + CONCURRENT + 1 + RECONNECTS;
    let deadline = Instant::now() + Duration::from_secs(3);
    let counters = loop {
        let raw = qemu.next_raw().expect("QEMU runs");
        on_line(&qemu, &raw, &mut heartbeats);
        if let Some((_, Some(c))) = heartbeats.last() {
            if c.tcp_replies >= replies && c.udp_echoes >= UDP_PROBES - report.udp_lost {
                break *c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the heartbeat's counters never reached the client's; console:\n{}",
            qemu.console()
        );
    };
    eprintln!("guest counters: {counters:?}");
    assert_eq!(report.udp_lost, 0, "UDP probes lost");
    assert_eq!(
        (
            counters.tcp_conns,
            counters.tcp_replies,
            counters.udp_echoes,
            counters.net_err
        ),
        (conns, replies, UDP_PROBES, 1),
        "guest counters (conns, replies, udp, err); console:\n{}",
        qemu.console()
    );
    // Every request and probe is a received frame, every reply and echo a
    // sent one (ARP, SYN, ACK and FIN frames come on top).
    assert!(counters.net_rx >= replies + UDP_PROBES, "{counters:?}");
    assert!(counters.net_tx >= replies + UDP_PROBES, "{counters:?}");

    // Heartbeats numbered without a gap, and the workload kept verifying.
    for pair in heartbeats.windows(2) {
        assert_eq!(pair[1].0.seq, pair[0].0.seq + 1, "heartbeat numbering");
    }
    let after = heartbeats.last().map(|(hb, _)| hb.ver).unwrap_or(0);
    assert!(
        after > before,
        "no page verified during the exchange: ver {before} -> {after}"
    );

    let stall = heartbeats.iter().map(|(hb, _)| hb.stall_us).max();
    eprintln!("longest guest-seen stall in any heartbeat: {stall:?} us");
    let p50 = percentiles("TCP", &mut report.rtts);
    percentiles("UDP", &mut report.udp_rtts);
    // Functional, not a benchmark: a guest that only served the network
    // every 50 ms (its longest wait) would fail this by far.
    assert!(
        p50 < Duration::from_millis(20),
        "median TCP round trip {p50:?}"
    );
    drop(qemu);
}

#[test]
fn tcp_and_udp_echo_on_legacy_virtio_mmio() {
    echo_while_dirty(
        "tcp_and_udp_echo_on_legacy_virtio_mmio",
        "v1",
        false,
        "52:54:00:12:34:56",
    );
}

#[test]
fn tcp_and_udp_echo_on_modern_virtio_mmio() {
    echo_while_dirty(
        "tcp_and_udp_echo_on_modern_virtio_mmio",
        "v2",
        true,
        "52:54:00:65:43:21",
    );
}

#[test]
fn net_without_a_device_exits() {
    if !common::kvm_or_skip("net_without_a_device_exits") {
        return;
    }
    let (code, reason, status) =
        run_to_exit(&QemuSpec::microvm("workload=idle net=10.99.0.2/24:7000"));
    assert_eq!(code, exit_code::NO_NET, "{reason}");
    assert!(
        reason.contains("no virtio-net device") && reason.contains("0xfeb00000"),
        "{reason}"
    );
    assert_eq!(status.code(), Some(2 * exit_code::NO_NET as i32 + 1));
}

#[test]
fn bad_net_values_exit() {
    if !common::kvm_or_skip("bad_net_values_exit") {
        return;
    }
    for (net, word) in [
        ("net=10.99.0.2/33:7000", "PREFIX"),
        ("net=10.99.0.2/24:0", "PORT"),
        ("net=10.99.0.2:7000", "IP/PREFIX:PORT"),
        ("net=127.0.0.1/8:7000", "unicast"),
        ("net=10.99.0.2/24:1 net=10.99.0.3/24:1", "twice"),
    ] {
        let (code, reason, _) = run_to_exit(&QemuSpec::microvm(&format!("workload=idle {net}")));
        assert_eq!(code, exit_code::BAD_CMDLINE, "{net}: {reason}");
        assert!(reason.contains(word), "{net}: {reason}");
    }
}
