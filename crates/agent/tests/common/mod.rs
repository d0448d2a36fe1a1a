//! Shared by the agent's tests: a `ferryd` with its own temporary state
//! directory and socket, run as a real process; a client for its API; and
//! guards that remove every process and file a test made, even when it
//! fails.
#![allow(dead_code)]

pub mod peers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::client::{AgentClient, Reply};
use serde_json::{json, Value};

/// True when /dev/kvm is usable; otherwise says loudly that the test is
/// skipped (never a silent pass).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "SKIPPED {test}: /dev/kvm is not usable here ({e}); this test needs real KVM"
            );
            println!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

pub fn ferryd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

/// The `ferry` binary of the same build (the agent starts it for each VM).
pub fn ferry_bin() -> PathBuf {
    let bin = ferryd_bin().with_file_name("ferry");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build --release -p ferry)",
        bin.display()
    );
    bin
}

/// A fresh directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferryd-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use ferry_agent::procs::{is_alive as alive, processes_mentioning};

pub fn kill9(pid: u32) {
    // SAFETY: kill(2) with a valid signal on a pid this test started (its
    // agent or that agent's VMM).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Waits until `pid` is gone (or a zombie), panicking after `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `ferryd` of one test: its directory (config, state, socket) and its
/// process. Dropping it kills the agent and every VMM it started, and
/// removes the directory.
pub struct Agent {
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    pub client: AgentClient,
}

impl Agent {
    /// A config with capacity `memory` and `vcpus`; `ferry_bin` None: the
    /// build's own (the default, next to ferryd).
    pub fn new(name: &str, memory: &str, vcpus: u32) -> Self {
        Self::with_ferry_bin(name, memory, vcpus, None)
    }

    pub fn with_ferry_bin(name: &str, memory: &str, vcpus: u32, ferry_bin: Option<&Path>) -> Self {
        Self::with_extra(name, memory, vcpus, ferry_bin, "", |_| {})
    }

    /// Like [`Agent::with_ferry_bin`], with `extra` lines in the config
    /// (before `[capacity]`), after `prepare` has run on the fresh
    /// directory (e.g. to make its TLS identity).
    pub fn with_extra(
        name: &str,
        memory: &str,
        vcpus: u32,
        ferry_bin: Option<&Path>,
        extra: &str,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        let dir = TempDir::new(name);
        prepare(&dir.0);
        let socket = dir.path("ferryd.sock");
        let config = dir.path("host.toml");
        let bin_line = ferry_bin.map_or(String::new(), |b| {
            format!("ferry_bin = \"{}\"\n", b.display())
        });
        std::fs::write(
            &config,
            format!(
                "host_name = \"test-{name}\"\npeer_listen = \"127.0.0.1:0\"\nsocket = \"{}\"\nstate_dir = \"{}\"\n{bin_line}{extra}[capacity]\nmemory = \"{memory}\"\nvcpus = {vcpus}\n",
                socket.display(),
                dir.path("state").display()
            ),
        )
        .unwrap();
        let mut client = AgentClient::new(&socket);
        client.timeout = Duration::from_secs(90);
        let mut agent = Self {
            dir,
            config,
            socket,
            child: None,
            client,
        };
        agent.start();
        agent
    }

    /// Starts ferryd and waits until its API answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "ferryd runs already");
        let child = Command::new(ferryd_bin())
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferryd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get("/v1/vms") {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ferryd exited while starting: {status}");
            }
            assert!(Instant::now() < deadline, "ferryd's API never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ferryd runs").id()
    }

    /// kill -9 the agent (its VMs must not notice).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("ferryd runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// kill -9 the agent, run `meanwhile` while it is down (its VMMs run
    /// on), and start it again; `meanwhile`'s result.
    pub fn kill9_then_start<T>(&mut self, meanwhile: impl FnOnce() -> T) -> T {
        self.kill9();
        let result = meanwhile();
        self.start();
        result
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("ferryd runs");
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn get(&self, path: &str) -> Reply {
        self.client.get(path).expect("GET")
    }

    pub fn post(&self, path: &str, body: Option<Value>) -> Reply {
        self.client
            .request("POST", path, body.as_ref())
            .expect("POST")
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.client.request("DELETE", path, None).expect("DELETE")
    }

    /// Creates a small VM, asserting 201.
    pub fn create_vm(&self, id: &str, mem: &str, workload: &str) -> Value {
        let mem_bytes = ferry_agent::config::parse_size(mem).unwrap();
        let r = self.post(
            "/v1/vms",
            Some(json!({"id": id, "definition": {"mem_bytes": mem_bytes, "workload": workload}})),
        );
        assert_eq!(r.status, 201, "create {id}: {}", r.text());
        r.json()
    }

    /// `GET /v1/vms/{id}`, asserting 200.
    pub fn show(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/vms/{id}"));
        assert_eq!(r.status, 200, "show {id}: {}", r.text());
        r.json()
    }

    /// The latest heartbeat the VM's VMM saw (waits for a first one).
    pub fn heartbeat(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.show(id);
            let hb = &v["live"]["heartbeat"];
            if hb.is_object() {
                return hb.clone();
            }
            assert!(Instant::now() < deadline, "no heartbeat from {id}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the VM's heartbeat seq is above `seq`; returns it.
    pub fn heartbeat_after(&self, id: &str, seq: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let hb = self.heartbeat(id);
            if hb["seq"].as_u64().unwrap() > seq {
                return hb;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: heartbeat stuck at {hb} (wanted past seq {seq})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path("state").join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    pub fn needle(&self) -> String {
        self.dir.0.display().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The VMMs live on by design; a test removes its own.
        for pid in processes_mentioning(&self.needle()) {
            kill9(pid);
        }
        for pid in processes_mentioning(&self.needle()) {
            let _ = std::panic::catch_unwind(|| wait_gone(pid, Duration::from_secs(10)));
        }
    }
}
