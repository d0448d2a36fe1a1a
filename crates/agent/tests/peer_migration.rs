//! Migrations between two real `ferryd` processes on real KVM, their
//! control plane over mutual TLS 1.3 with certificates made by `ferry ca`:
//! the VM verified on the destination (heartbeats go on in sequence, no
//! page error), refusals that change nothing, a second migration and
//! modify calls refused while one runs, and a cancel during the first
//! pass that leaves the VM running on the source.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{host, peer_addr, reserved, wait_job};
use common::{ferry_bin, kvm_or_skip, Agent, TempDir};
use serde_json::{json, Value};

/// A CA of the test's own and the identities it issued.
struct Fleet {
    dir: TempDir,
}

impl Fleet {
    fn new(name: &str) -> Self {
        let dir = TempDir::new(&format!("ca-{name}"));
        let out = Command::new(ferry_bin())
            .args(["ca", "init"])
            .arg(dir.path("ca"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ca init: {out:?}");
        Self { dir }
    }

    /// Issues `name`'s identity; its directory.
    fn issue(&self, name: &str, operator: bool) -> PathBuf {
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["ca", "issue", "--name", name]);
        if operator {
            cmd.arg("--operator");
        } else {
            cmd.args(["--ip", "127.0.0.1"]);
        }
        let out = cmd.arg(self.dir.path("ca")).output().unwrap();
        assert!(out.status.success(), "ca issue {name}: {out:?}");
        self.dir.path("ca").join(name)
    }
}

/// An agent named `test-NAME` with its identity from `fleet`.
fn agent(name: &str, fleet: &Fleet, memory: &str, plaintext: bool) -> Agent {
    let id = fleet.issue(&format!("test-{name}"), false);
    let extra = format!(
        "tls_dir = \"{}\"\ninsecure_plaintext_data_plane = {plaintext}\n",
        id.display()
    );
    Agent::with_extra(name, memory, 4, None, &extra, |_| {})
}

fn start(from: &Agent, vm: &str, to: &Agent, extra: Value) -> ferry_agent::client::Reply {
    let mut body = json!({"target": {"host": host(to), "address": peer_addr(to)}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    from.post(&format!("/v1/vms/{vm}/migrations"), Some(body))
}

/// Migrates `vm` and checks it arrived whole: its guest's heartbeats go
/// on past the last seen on the source, with no page error and no break.
fn migrate_verified(from: &Agent, to: &Agent, vm: &str) -> Value {
    let before = from.heartbeat(vm);
    let r = start(from, vm, to, json!({}));
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_owned();
    let done = wait_job(from, &id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    assert!(
        done["transport"].as_str().unwrap().contains("plaintext"),
        "{done}"
    );
    assert!(done["report"]["bytes_sent"].as_u64().unwrap() > 0, "{done}");
    assert!(done["progress_lines"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(from.get(&format!("/v1/vms/{vm}")).status, 404);
    let hb = to.heartbeat_after(vm, before["seq"].as_u64().unwrap(), Duration::from_secs(20));
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    // And it keeps running there.
    let later = to.heartbeat_after(vm, hb["seq"].as_u64().unwrap() + 2, Duration::from_secs(20));
    assert_eq!(later["err"], 0, "{later}");
    assert_eq!(to.show(vm)["state"], "running");
    done
}

#[test]
fn a_vm_moves_between_two_agents_and_back_three_times() {
    if !kvm_or_skip("a_vm_moves_between_two_agents_and_back_three_times") {
        return;
    }
    let fleet = Fleet::new("pingpong");
    let a = agent("pp-a", &fleet, "2G", true);
    let b = agent("pp-b", &fleet, "2G", true);
    a.create_vm("vm1", "256M", "dirty:32:50");
    a.heartbeat("vm1");
    for _ in 0..3 {
        migrate_verified(&a, &b, "vm1");
        migrate_verified(&b, &a, "vm1");
    }
    // The audit names the peer's certificate for the prepare.
    let audit = b.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l["action"] == "POST /v1/peer/migrations"
                && l["who"]["uri"] == format!("ferry://host/{}", host(&a))
                && l["outcome"] == "ok"),
        "{audit:?}"
    );
    assert_eq!(reserved(&b, "ferryd_memory_reserved_bytes"), 0);
    assert_eq!(reserved(&a, "ferryd_memory_reserved_incoming_bytes"), 0);
    let metrics = a.get("/metrics").text();
    assert!(
        metrics.contains("ferryd_migrations_total{outcome=\"committed\"} 3"),
        "{metrics}"
    );

    // The same from the command line: ferry vm migrate, ferry migration show.
    let before = a.heartbeat("vm1");
    let out = Command::new(ferry_bin())
        .args(["vm", "migrate", "vm1", "--json", "--to"])
        .arg(format!("{}@{}", host(&b), peer_addr(&b)))
        .arg("--agent")
        .arg(&a.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "ferry vm migrate: {out:?}");
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["phase"], "committed", "{job}");
    let hb = b.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    let out = Command::new(ferry_bin())
        .args(["migration", "show", job["id"].as_str().unwrap(), "--agent"])
        .arg(&a.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("committed"),
        "{out:?}"
    );
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn a_second_migration_and_modify_calls_are_refused_and_a_cancel_in_the_first_pass_leaves_the_vm_on_the_source(
) {
    if !kvm_or_skip("cancel") {
        return;
    }
    let fleet = Fleet::new("cancel");
    let a = agent("cn-a", &fleet, "2G", true);
    let b = agent("cn-b", &fleet, "2G", true);
    // 256 MiB filled, sent at 32 MiB/s: a first pass of several seconds.
    a.create_vm("vm1", "512M", "dirty:16:20:256");
    let before = a.heartbeat("vm1");
    let r = start(&a, "vm1", &b, json!({"bandwidth": 32u64 << 20}));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();

    let second = start(&a, "vm1", &b, json!({}));
    assert_eq!(second.status, 409, "{}", second.text());
    assert!(second.text().contains(&id), "{}", second.text());
    let pause = a.post("/v1/vms/vm1/pause", None);
    assert_eq!(pause.status, 409, "{}", pause.text());
    assert!(pause.text().contains(&id), "{}", pause.text());

    // Wait for the first pass to be under way, then cancel.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = a.get(&format!("/v1/migrations/{id}")).json();
        if v["progress"]["round"] == 1 && v["progress"]["sent_mib"].as_f64().unwrap_or(0.0) > 1.0 {
            break;
        }
        assert!(v["phase"] != "committed" && v["phase"] != "failed", "{v}");
        assert!(Instant::now() < deadline, "no first pass: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reserved(&b, "ferryd_memory_reserved_incoming_bytes") > 0);
    let c = a.delete(&format!("/v1/migrations/{id}"));
    assert_eq!(c.status, 202, "{}", c.text());
    let done = wait_job(&a, &id, Duration::from_secs(60));
    assert_eq!(done["phase"], "cancelled", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by the operator"),
        "{done}"
    );
    // The engine stopped at the end of the pass the cancel came in.
    assert_eq!(
        done["report"]["rounds"].as_array().map(Vec::len),
        Some(1),
        "{done}"
    );
    assert_eq!(
        done["report"]["outcome"],
        "aborted: VM running on the source"
    );
    // The VM runs on the source, whole.
    let hb = a.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap() + 3,
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    assert_eq!(a.show("vm1")["state"], "running");
    // The destination let go of everything.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reserved(&b, "ferryd_memory_reserved_bytes") != 0 {
        assert!(
            Instant::now() < deadline,
            "the destination still reserves memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.get("/v1/vms").json(), json!([]));
    assert_eq!(
        a.delete(&format!("/v1/migrations/{id}")).status,
        409,
        "an ended job cannot be cancelled"
    );
    // A modify call works again, and so does a migration.
    migrate_verified(&a, &b, "vm1");
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn refusals_change_nothing() {
    if !kvm_or_skip("refusals_change_nothing") {
        return;
    }
    let fleet = Fleet::new("refuse");
    let a = agent("rf-a", &fleet, "2G", true);
    let small = agent("rf-small", &fleet, "128M", true);
    let strict = agent("rf-strict", &fleet, "2G", false);
    a.create_vm("vm1", "256M", "dirty:32:50");
    let before = a.heartbeat("vm1");

    // A destination over capacity: 503 from it, before anything moves.
    let r = start(&a, "vm1", &small, json!({}));
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_job(
        &a,
        r.json()["id"].as_str().unwrap(),
        Duration::from_secs(30),
    );
    assert_eq!(done["phase"], "failed", "{done}");
    let why = done["error"].as_str().unwrap();
    assert!(why.contains("503") && why.contains("no capacity"), "{why}");
    assert!(done["report"].is_null(), "nothing moved: {done}");

    // (A destination that does not allow a plaintext data plane gets
    // mutual TLS: tests/data_plane.rs.)

    // The wrong host at the address: its certificate is not the target's.
    let r = a.post(
        "/v1/vms/vm1/migrations",
        Some(json!({"target": {"host": host(&strict), "address": peer_addr(&small)}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_job(
        &a,
        r.json()["id"].as_str().unwrap(),
        Duration::from_secs(30),
    );
    assert_eq!(done["phase"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("TLS handshake failed"),
        "{done}"
    );

    // Bad input.
    let r = a.post(
        "/v1/vms/vm1/migrations",
        Some(json!({"target": {"host": host(&small), "address": "nowhere"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = start(&a, "vm1", &small, json!({"mode": "postcopy"}));
    assert_eq!(r.status, 422, "{}", r.text());

    // Strangers on the peer listener: another CA's certificate, or none.
    let stranger_fleet = Fleet::new("stranger");
    let stranger = ferry_identity::Identity::load(&stranger_fleet.issue(&host(&a), false)).unwrap();
    let foreign = ferry_identity::client_config(&stranger, &["http/1.1"]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let offer = json!({"job": "x", "vm": "vm9", "definition": {"mem_bytes": 64u64 << 20},
        "policy": {}, "plaintext_data_plane": true});
    let call = |config: &Arc<rustls::ClientConfig>, path: &str, body: Option<&Value>| {
        let method = if body.is_some() { "POST" } else { "GET" };
        rt.block_on(ferry_agent::peer::call(
            config,
            &host(&small),
            &peer_addr(&small),
            method,
            path,
            body,
        ))
    };
    let e = call(&foreign, "/v1/peer/migrations", Some(&offer));
    assert!(e.is_err(), "a foreign CA's client got in: {e:?}");
    let small_id =
        ferry_identity::Identity::load(&fleet.dir.path("ca").join(host(&small))).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(small_id.ca_cert().clone()).unwrap();
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let e = call(&anonymous, "/v1/peer/migrations", Some(&offer));
    assert!(e.is_err(), "a client without a certificate got in: {e:?}");

    // A host of the fleet may call only the peer endpoints; an operator
    // anything.
    let a_id = ferry_identity::Identity::load(&fleet.dir.path("ca").join(host(&a))).unwrap();
    let as_host = ferry_identity::client_config(&a_id, &["http/1.1"]).unwrap();
    let r = call(&as_host, "/v1/vms", None).unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let op = ferry_identity::Identity::load(&fleet.issue("ops", true)).unwrap();
    let as_operator = ferry_identity::client_config(&op, &["http/1.1"]).unwrap();
    let r = call(&as_operator, "/v1/vms", None).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Nothing changed anywhere; the VM ran on.
    for d in [&small, &strict] {
        assert_eq!(d.get("/v1/vms").json(), json!([]));
        assert_eq!(reserved(d, "ferryd_memory_reserved_bytes"), 0);
    }
    let hb = a.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(a.show("vm1")["state"], "running");
    assert_eq!(a.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn a_migration_past_its_completion_timeout_is_aborted_with_the_vm_on_the_source() {
    if !kvm_or_skip("completion_timeout") {
        return;
    }
    let fleet = Fleet::new("timeout");
    let a = agent("to-a", &fleet, "2G", true);
    let b = agent("to-b", &fleet, "2G", true);
    let r = a.post(
        "/v1/vms",
        Some(json!({"id": "vm1",
            "definition": {"mem_bytes": 256u64 << 20, "workload": "dirty:32:50"},
            "policy": {"completion_timeout_ms": 300}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let before = a.heartbeat("vm1");
    // 4 MiB/s: the first pass alone takes seconds.
    let r = start(&a, "vm1", &b, json!({"bandwidth": 4u64 << 20}));
    assert_eq!(r.status, 202, "{}", r.text());
    let done = wait_job(
        &a,
        r.json()["id"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(done["phase"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("completion timeout"),
        "{done}"
    );
    let hb = a.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap() + 3,
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(a.show("vm1")["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reserved(&b, "ferryd_memory_reserved_bytes") != 0 {
        assert!(
            Instant::now() < deadline,
            "the destination still reserves memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.get("/v1/vms").json(), json!([]));
    assert_eq!(a.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn a_cancel_while_the_destination_prepares_leaves_the_vm_on_the_source() {
    if !kvm_or_skip("cancel_in_setup") {
        return;
    }
    let fleet = Fleet::new("setup");
    let a = agent("su-a", &fleet, "2G", true);
    // The destination's receiver takes a second to start: the job sits in
    // its setup phase meanwhile.
    let id = fleet.issue("test-su-b", false);
    let extra = format!(
        "tls_dir = \"{}\"\ninsecure_plaintext_data_plane = true\n",
        id.display()
    );
    let slow = fleet.dir.path("slow-ferry");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 1\nexec {} \"$@\"\n",
            ferry_bin().display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&slow)
        .status()
        .unwrap();
    let b = Agent::with_extra("su-b", "2G", 4, Some(&slow), &extra, |_| {});
    a.create_vm("vm1", "256M", "dirty:32:50");
    let before = a.heartbeat("vm1");
    let r = start(&a, "vm1", &b, json!({}));
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        a.get(&format!("/v1/migrations/{job}")).json()["phase"],
        "preparing"
    );
    let c = a.delete(&format!("/v1/migrations/{job}"));
    assert_eq!(c.status, 202, "{}", c.text());
    let done = wait_job(&a, &job, Duration::from_secs(60));
    assert_eq!(done["phase"], "cancelled", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("before the data plane started"),
        "{done}"
    );
    assert!(done["report"].is_null(), "no page moved: {done}");
    let hb = a.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap() + 3,
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    assert_eq!(a.show("vm1")["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reserved(&b, "ferryd_memory_reserved_bytes") != 0 {
        assert!(
            Instant::now() < deadline,
            "the destination still reserves memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.get("/v1/vms").json(), json!([]));
    assert_eq!(a.delete("/v1/vms/vm1").status, 200);
}
