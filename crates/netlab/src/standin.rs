//! A stand-in for the test guest, so the topology and the probe are tested
//! without a VM: namespace PREFIX-vm with one veth (`eth0`, the guest's IP
//! and a fixed MAC) whose other end sits on a host's bridge, and a small
//! echo server there speaking the guest's protocol (TCP lines answered
//! `R <line>`, R counting from 1 per connection; UDP datagrams echoed).
//! Moving the veth's far end from host A's bridge to host B's is a
//! migration at the topology level: the server and its connections stay.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::announce::{garp_frame, rarp_frame, send_frames};
use crate::command::run;

use crate::netns::in_netns;
use crate::{Host, MacAddr, NetlabError, Topology, TopologyNames};

/// The stand-in's interface inside its namespace.
const IFNAME: &str = "eth0";
const POLL: Duration = Duration::from_millis(20);
/// A stand-in serves at most this long (every loop is bounded).
const MAX_LIFETIME: Duration = Duration::from_secs(900);
const MAX_CONNECTIONS: usize = 64;

/// Runs `ip` with the words of `args` (the topology's names hold no
/// spaces).
fn ip(args: &str) -> Result<String, NetlabError> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

#[derive(Default, Debug)]
struct Counters {
    tcp_conns: AtomicU64,
    tcp_replies: AtomicU64,
    udp_echoes: AtomicU64,
}

/// What the stand-in served, like the guest's heartbeat fields.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct StandInCounters {
    pub tcp_conns: u64,
    pub tcp_replies: u64,
    pub udp_echoes: u64,
}

pub struct StandIn {
    names: TopologyNames,
    mac: MacAddr,
    port: u16,
    host: Host,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    /// Whether this value made the namespace (and so must remove it): a
    /// second stand-in on the same topology fails without touching the
    /// first one's.
    made_ns: bool,
}

impl StandIn {
    /// Makes the stand-in on host A's bridge and starts serving on `port`.
    pub fn start(topology: &Topology, port: u16) -> Result<StandIn, NetlabError> {
        let names = topology.names().clone();
        let n = names.subnet_index;
        let mac = MacAddr([0x02, 0x6e, 0x6c, 0x00, n, 0x02]);
        let mut standin = StandIn {
            names,
            mac,
            port,
            host: Host::A,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::default()),
            threads: Vec::new(),
            made_ns: false,
        };
        // On failure, Drop removes whatever was made.
        standin.make_link()?;
        standin.serve()?;
        Ok(standin)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.names.guest_ip
    }

    pub fn host(&self) -> Host {
        self.host
    }

    pub fn counters(&self) -> StandInCounters {
        StandInCounters {
            tcp_conns: self.counters.tcp_conns.load(Ordering::Relaxed),
            tcp_replies: self.counters.tcp_replies.load(Ordering::Relaxed),
            udp_echoes: self.counters.udp_echoes.load(Ordering::Relaxed),
        }
    }

    fn make_link(&mut self) -> Result<(), NetlabError> {
        let vm = &self.names.standin.ns;
        let host = &self.names.host_a;
        let peer = &self.names.standin.port;
        let addr = format!("{}/{}", self.names.guest_ip, self.names.prefix_len);
        let mac = self.mac.to_string();
        ip(&format!("netns add {vm}"))?;
        self.made_ns = true;
        // As quiet as the topology's namespaces: no IPv6 chatter and no
        // gratuitous ARP when the link comes up, so an announce is only
        // ever the one a test sends.
        let sysctl = format!("netns exec {vm} sysctl -qw");
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            ip(&format!(
                "{sysctl} net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
            ))?;
        }
        ip(&format!(
            "{sysctl} net.ipv4.conf.all.arp_notify=0 net.ipv4.conf.default.arp_notify=0"
        ))?;
        ip(&format!("-n {vm} link set lo up"))?;
        ip(&format!(
            "-n {vm} link add {IFNAME} address {mac} type veth peer name {peer} netns {}",
            host.ns
        ))?;
        ip(&format!("-n {vm} addr add {addr} dev {IFNAME}"))?;
        ip(&format!("-n {vm} link set {IFNAME} up"))?;
        ip(&format!(
            "-n {} link set {peer} master {} up",
            host.ns, host.bridge
        ))?;
        wait_operational(vm, IFNAME, &host.ns, peer)?;
        Ok(())
    }

    fn serve(&mut self) -> Result<(), NetlabError> {
        let vm = &self.names.standin.ns;
        let addr = SocketAddrV4::new(self.names.guest_ip, self.port);
        let (listener, udp) = in_netns(vm, move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            let u = UdpSocket::bind(addr)?;
            u.set_read_timeout(Some(POLL))?;
            Ok::<_, std::io::Error>((l, u))
        })?
        .map_err(|source| NetlabError::Io {
            ns: vm.clone(),
            what: format!("listening on {addr}"),
            source,
        })?;
        let until = Instant::now() + MAX_LIFETIME;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|source| NetlabError::Thread {
                    ns: vm.clone(),
                    source,
                })
        };
        let (stop, counters) = (Arc::clone(&self.stop), Arc::clone(&self.counters));
        let acceptor = spawn(
            "stand-in tcp",
            Box::new(move || accept_loop(listener, stop, counters, until)),
        )?;
        self.threads.push(acceptor);
        let (stop, counters) = (Arc::clone(&self.stop), Arc::clone(&self.counters));
        let echo = spawn(
            "stand-in udp",
            Box::new(move || udp_loop(udp, stop, counters, until)),
        )?;
        self.threads.push(echo);
        Ok(())
    }

    /// Moves the stand-in's link to `host`'s bridge, as a migration moves
    /// a VM: its sockets and connections stay; nothing is announced.
    /// Returns once the link carries traffic again (the "blackout").
    pub fn move_to(&mut self, host: Host) -> Result<(), NetlabError> {
        if host == self.host {
            return Err(NetlabError::AlreadyThere(host));
        }
        let from = self.names.host(self.host).clone();
        let to = self.names.host(host).clone();
        let peer = &self.names.standin.port;
        ip(&format!("-n {} link set {peer} netns {}", from.ns, to.ns))?;
        self.host = host;
        ip(&format!(
            "-n {} link set {peer} master {} up",
            to.ns, to.bridge
        ))?;
        wait_operational(&self.names.standin.ns, IFNAME, &to.ns, peer)?;
        Ok(())
    }

    /// Says where the stand-in now is, as the destination VMM does: one
    /// RARP in QEMU's format and one gratuitous ARP, from its interface.
    pub fn announce(&self) -> Result<(), NetlabError> {
        let rarp = rarp_frame(self.mac);
        let garp = garp_frame(self.mac, self.names.guest_ip);
        send_frames(&self.names.standin.ns, IFNAME, &[&rarp, &garp])
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Threads end within a poll; connection threads are joined by the
        // acceptor before it ends.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let vm = &self.names.standin.ns;
        if self.made_ns && std::path::Path::new("/run/netns").join(vm).exists() {
            // Deleting the veth removes both its ends at once; a deleted
            // namespace's devices go only when the kernel gets to it, and
            // the host's end would still hold its name for a next
            // stand-in.
            let _ = ip(&format!("-n {vm} link delete {IFNAME}"));
            if let Err(e) = ip(&format!("netns delete {vm}")) {
                eprintln!("netlab: could not remove the stand-in's namespace: {e}");
            }
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shut();
    }
}

/// How long a link may take to carry traffic after it is set up.
const LINK_UP_LIMIT: Duration = Duration::from_secs(3);

/// Waits until the veth `ifname` (in `ns`) and its peer `port` (in
/// `host_ns`, on a bridge) carry traffic: a link set up works only once the
/// kernel's link watcher has seen its carrier, up to a second later, and
/// until then drops what is sent on it.
fn wait_operational(ns: &str, ifname: &str, host_ns: &str, port: &str) -> Result<(), NetlabError> {
    let start = Instant::now();
    let up = |ns: &str, dev: &str| {
        ip(&format!("-n {ns} -o link show dev {dev}")).is_ok_and(|out| out.contains("state UP"))
    };
    let forwarding = || {
        run("bridge", &["-n", host_ns, "link", "show", "dev", port])
            .is_ok_and(|out| out.contains("state forwarding"))
    };
    while start.elapsed() < LINK_UP_LIMIT {
        if up(ns, ifname) && up(host_ns, port) && forwarding() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(NetlabError::Command {
        command: format!("waiting for {ns}/{ifname} and {host_ns}/{port} to carry traffic"),
        status: format!("not up after {} s", LINK_UP_LIMIT.as_secs()),
        stderr: String::new(),
    })
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    until: Instant,
) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match listener.accept() {
            Ok((stream, _)) if conns.len() < MAX_CONNECTIONS => {
                counters.tcp_conns.fetch_add(1, Ordering::Relaxed);
                let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
                if let Ok(t) = std::thread::Builder::new()
                    .name("stand-in conn".into())
                    .spawn(move || serve_connection(stream, stop, counters, until))
                {
                    conns.push(t);
                }
            }
            Ok(_) => {} // over the limit: dropped, so closed
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

fn serve_connection(
    mut stream: TcpStream,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    until: Instant,
) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(POLL)).is_err()
        || stream.set_nodelay(true).is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut line = Vec::with_capacity(64);
    let mut replies = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut out = Vec::new();
                let mut batch = 0;
                for &b in &buf[..n] {
                    if b != b'\n' {
                        if line.len() < 64 {
                            line.push(b);
                        }
                        continue;
                    }
                    replies += 1;
                    batch += 1;
                    out.extend_from_slice(format!("{replies} ").as_bytes());
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                    line.clear();
                }
                if !out.is_empty() {
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                    counters.tcp_replies.fetch_add(batch, Ordering::Relaxed);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn udp_loop(socket: UdpSocket, stop: Arc<AtomicBool>, counters: Arc<Counters>, until: Instant) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        // A timeout just lets the loop look at the stop flag.
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if socket.send_to(&buf[..n], from).is_ok() {
                counters.udp_echoes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
