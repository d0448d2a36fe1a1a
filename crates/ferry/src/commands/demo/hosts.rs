//! The demo's two hosts: a CA made for the demo, an identity for each
//! host, and a `ferryd` for each. As root each host is its own network
//! namespace of netlab's topology (its address on its bridge); otherwise
//! the two agents listen on two loopback addresses. Dropping `DemoHosts`
//! kills both agents and every VMM they started, removes the namespaces
//! and the demo's directory.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_agent::client::AgentClient;
use ferry_agent::procs::processes_mentioning;
use ferry_identity::IssueRequest;
use ferry_netlab::{Host, Topology};

/// How long an agent may take to answer its API and bind its listener.
const AGENT_START: Duration = Duration::from_secs(30);

pub struct DemoHost {
    pub name: String,
    /// The namespace the agent (and its VMMs) run in, if any.
    pub netns: Option<String>,
    pub dir: PathBuf,
    pub client: AgentClient,
    /// host:port of its peer (mutual TLS) listener.
    pub peer_addr: String,
    child: Option<Child>,
}

impl DemoHost {
    /// The agent's own log (its VMMs log under its state directory).
    pub fn log(&self) -> PathBuf {
        self.dir.join("ferryd.log")
    }

    /// The last lines the agent logged, for a failure's message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }
}

pub struct DemoHosts {
    root: PathBuf,
    pub a: DemoHost,
    pub b: DemoHost,
    topology: Option<Topology>,
}

impl DemoHosts {
    /// Makes the CA, both identities and both agents, each with room for
    /// one VM of `mem_bytes` and `vcpus`.
    pub fn start(mem_bytes: u64, vcpus: u32) -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot make the demo's directory {}", root.display()))?;
        let mut made = Self::build(&root, mem_bytes, vcpus);
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&root);
        }
        if let Ok(hosts) = made.as_mut() {
            hosts.wait_ready()?;
        }
        made
    }

    fn build(root: &Path, mem_bytes: u64, vcpus: u32) -> anyhow::Result<Self> {
        let topology = match Topology::skip_reason() {
            None => Some(
                Topology::up(&format!("fdemo{}", std::process::id()))
                    .context("cannot build the demo's network namespaces")?,
            ),
            // Not root (or no iproute2): two loopback addresses.
            Some(_) => None,
        };
        let place = |host: Host, loopback: Ipv4Addr| match &topology {
            Some(t) => (IpAddr::V4(t.host(host).ip), Some(t.host(host).ns.clone())),
            None => (IpAddr::V4(loopback), None),
        };
        let (ip_a, ns_a) = place(Host::A, Ipv4Addr::new(127, 0, 0, 2));
        let (ip_b, ns_b) = place(Host::B, Ipv4Addr::new(127, 0, 0, 3));
        let ca = root.join("ca");
        ferry_identity::ca::init_ca(&ca, "ferry demo CA", 1)
            .context("cannot make the demo's CA")?;
        // Room for the VM and a second one, so a reservation never fails
        // for want of capacity while the first is still on its way out.
        let capacity = (mem_bytes * 2, vcpus * 2);
        let start = |name: &str, ip, netns| -> anyhow::Result<DemoHost> {
            ferry_identity::ca::issue(&ca, &IssueRequest::host(name).ip(ip), false)
                .with_context(|| format!("cannot issue {name}'s certificate"))?;
            start_agent(root, &ca, name, ip, netns, capacity)
        };
        let a = start("hostA", ip_a, ns_a)?;
        let b = start("hostB", ip_b, ns_b)?;
        Ok(Self {
            root: root.to_owned(),
            a,
            b,
            topology,
        })
    }

    /// Waits until both agents answer and have bound their listeners.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        for host in [&mut self.a, &mut self.b] {
            let deadline = Instant::now() + AGENT_START;
            let addr_file = host.dir.join("state").join("peer.addr");
            loop {
                let answers = host
                    .client
                    .get("/v1/vms")
                    .map(|r| r.status == 200)
                    .unwrap_or(false);
                let bound = std::fs::read_to_string(&addr_file).ok();
                if let (true, Some(addr)) = (answers, bound) {
                    host.peer_addr = addr.trim().to_owned();
                    break;
                }
                if let Some(status) = host.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                    bail!(
                        "{}'s ferryd exited while starting ({status}): {}",
                        host.name,
                        host.log_tail(5)
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}'s ferryd did not come up within {} s: {}",
                        host.name,
                        AGENT_START.as_secs(),
                        host.log_tail(5)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// What the hosts are, in one line.
    pub fn describe(&self) -> String {
        let place = |h: &DemoHost| match &h.netns {
            Some(ns) => format!("{} ({} in namespace {ns})", h.name, h.peer_addr),
            None => format!("{} ({})", h.name, h.peer_addr),
        };
        format!(
            "two ferryd agents: {} and {}, mutual TLS with a CA made for the demo",
            place(&self.a),
            place(&self.b)
        )
    }
}

fn start_agent(
    root: &Path,
    ca: &Path,
    name: &str,
    ip: IpAddr,
    netns: Option<String>,
    (mem_bytes, vcpus): (u64, u32),
) -> anyhow::Result<DemoHost> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("ferryd.sock");
    let ferry = std::env::current_exe().context("cannot find the ferry binary")?;
    let ferryd = ferry.with_file_name("ferryd");
    if !ferryd.is_file() {
        bail!(
            "{} is missing: the demo runs two ferryd agents (build them with `cargo build --release`), or use `ferry demo --direct`",
            ferryd.display()
        );
    }
    let config = dir.join("host.toml");
    std::fs::write(
        &config,
        format!(
            "host_name = \"{name}\"\npeer_listen = \"{}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\ntls_dir = \"{}\"\nferry_bin = \"{}\"\n[capacity]\nmemory = \"{}M\"\nvcpus = {vcpus}\n",
            std::net::SocketAddr::new(ip, 0),
            socket.display(),
            dir.join("state").display(),
            ca.join(name).display(),
            ferry.display(),
            mem_bytes >> 20,
        ),
    )?;
    let log = File::create(dir.join("ferryd.log"))?;
    let mut cmd = match &netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&ferryd);
            c
        }
        None => Command::new(&ferryd),
    };
    cmd.arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}'s ferryd"))?;
    let mut client = AgentClient::new(&socket);
    client.timeout = Duration::from_secs(60);
    Ok(DemoHost {
        name: name.to_owned(),
        netns,
        dir,
        client,
        peer_addr: String::new(),
        child: Some(child),
    })
}

impl Drop for DemoHosts {
    fn drop(&mut self) {
        for host in [&mut self.a, &mut self.b] {
            if let Some(mut child) = host.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The agents' VMMs outlive them by design: end every process the
        // demo's directory appears in.
        let needle = self.root.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_mentioning(&needle);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                // SAFETY: kill(2) with a valid signal on a process whose
                // command line names this demo's own directory.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(t) = self.topology.take() {
            if let Err(e) = t.down() {
                eprintln!("ferry demo: could not remove the demo's namespaces: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
