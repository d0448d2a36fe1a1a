//! Two or more agents of one fleet: a CA made by `ferry ca`, each agent's
//! host identity, and the calls a migration test makes between them.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{ferry_bin, Agent, TempDir};

/// A CA of the test's own and the identities it issued.
pub struct Fleet {
    pub dir: TempDir,
}

impl Fleet {
    pub fn new(name: &str) -> Self {
        let dir = TempDir::new(&format!("ca-{name}"));
        let out = Command::new(ferry_bin())
            .args(["ca", "init"])
            .arg(dir.path("ca"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ca init: {out:?}");
        Self { dir }
    }

    /// Issues host `name`'s identity; its directory.
    pub fn issue(&self, name: &str) -> PathBuf {
        let out = Command::new(ferry_bin())
            .args(["ca", "issue", "--name", name, "--ip", "127.0.0.1"])
            .arg(self.dir.path("ca"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ca issue {name}: {out:?}");
        self.dir.path("ca").join(name)
    }
}

/// An agent named `test-NAME` with its identity from `fleet`; `plaintext`:
/// its config allows a plaintext data plane.
pub fn agent(name: &str, fleet: &Fleet, memory: &str, plaintext: bool) -> Agent {
    agent_with(name, fleet, memory, plaintext, "")
}

/// Like [`agent`], with `more` config (e.g. `[[network]]` tables) after
/// the identity lines.
pub fn agent_with(name: &str, fleet: &Fleet, memory: &str, plaintext: bool, more: &str) -> Agent {
    let id = fleet.issue(&format!("test-{name}"));
    let extra = format!(
        "tls_dir = \"{}\"\ninsecure_plaintext_data_plane = {plaintext}\n{more}",
        id.display()
    );
    Agent::with_extra(name, memory, 4, None, &extra, |_| {})
}

pub fn peer_addr(agent: &Agent) -> String {
    let path = agent.dir.path("state").join("peer.addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(a) = std::fs::read_to_string(&path) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn host(agent: &Agent) -> String {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("host_name = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned()
}

/// `POST /v1/vms/VM/migrations` towards `to`.
pub fn start(from: &Agent, vm: &str, to: &Agent) -> ferry_agent::client::Reply {
    let body = json!({"target": {"host": host(to), "address": peer_addr(to)}});
    from.post(&format!("/v1/vms/{vm}/migrations"), Some(body))
}

/// Polls a job until it has ended; returns it.
pub fn wait_job(agent: &Agent, job: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = agent.get(&format!("/v1/migrations/{job}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if ["committed", "failed", "cancelled"].contains(&v["phase"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {job} still {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a slow migration of `vm` from `from` to `to` (`bandwidth`
/// bytes/s) and waits until its data plane is well under way, so that an
/// agent can be killed in flight; the job's id and the destination's id
/// of it.
pub fn start_slow(from: &Agent, vm: &str, to: &Agent, bandwidth: u64) -> (String, String) {
    let r = from.post(
        &format!("/v1/vms/{vm}/migrations"),
        Some(
            json!({"target": {"host": host(to), "address": peer_addr(to)},
            "bandwidth": bandwidth}),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = from.get(&format!("/v1/migrations/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["phase"] == "transferring" && v["progress_lines"].as_u64().unwrap_or(0) > 2 {
            return (id, v["destination_migration"].as_str().unwrap().to_owned());
        }
        assert!(Instant::now() < deadline, "never transferring: {v}");
        assert!(v["phase"] != "committed", "ended before the kill: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cancels `from`'s job `id` and waits until it has ended cancelled.
pub fn cancel_and_wait(from: &Agent, id: &str) {
    let r = from.delete(&format!("/v1/migrations/{id}"));
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_job(from, id, Duration::from_secs(60));
    assert_eq!(done["phase"], "cancelled", "{done}");
}

/// The destination's view of its incoming migration `incoming` once it
/// has ended (it is no longer ready).
pub fn incoming_ended(to: &Agent, incoming: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = to.get(&format!("/v1/peer/migrations/{incoming}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if v["phase"] != "ready" {
            return v;
        }
        assert!(Instant::now() < deadline, "still ready: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Migrates `vm` and checks it arrived whole (its guest's heartbeats go
/// on past the last seen on the source, no page error, no break); returns
/// the ended job.
pub fn migrate_verified(from: &Agent, to: &Agent, vm: &str) -> Value {
    let before = from.heartbeat(vm);
    let r = start(from, vm, to);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = wait_job(from, &id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    assert_eq!(from.get(&format!("/v1/vms/{vm}")).status, 404);
    let hb = to.heartbeat_after(vm, before["seq"].as_u64().unwrap(), Duration::from_secs(20));
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    done
}

/// Makes `agent` bind the peer address it has now when it starts again
/// (its config said port 0): its sources, which keep that address in
/// their jobs, reach it after a restart as they would a real host.
pub fn keep_peer_addr(agent: &Agent) {
    let addr = peer_addr(agent);
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(text.contains("peer_listen = \"127.0.0.1:0\""), "{text}");
    let text = text.replace(
        "peer_listen = \"127.0.0.1:0\"",
        &format!("peer_listen = \"{addr}\""),
    );
    std::fs::write(&agent.config, text).unwrap();
}

/// Reserved memory in an agent's ledger (`metric`: one of its
/// `ferryd_memory_reserved_*` gauges), from its metrics.
pub fn reserved(agent: &Agent, metric: &str) -> u64 {
    let text = agent.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{metric} ")))
        .unwrap_or_else(|| panic!("no {metric} in {text}"))
        .trim()
        .parse()
        .unwrap()
}
