//! A cancel that comes too late (real KVM, two real agents over mutual
//! TLS): once the engine is in its blackout, or the VM runs on the
//! destination in post-copy, `DELETE /v1/migrations/{id}` is refused with
//! 409 and the reason, and the migration commits: the VM ends on the
//! destination, running and verified, nothing of it left on the source.

mod common;

use std::time::{Duration, Instant};

use common::peers::{agent, host, peer_addr, reserved, wait_job, Fleet};
use common::{kvm_or_skip, Agent};
use serde_json::{json, Value};

/// Creates vm1 (512 MiB, 64 MiB rewritten at 100 MiB/s, 256 MiB filled)
/// with post-copy allowed; its first heartbeat's seq.
fn create(a: &Agent) -> u64 {
    let r = a.post(
        "/v1/vms",
        Some(json!({"id": "vm1",
            "definition": {"mem_bytes": 512u64 << 20, "workload": "dirty:64:100:256"},
            "policy": {"allow_postcopy": true}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    a.heartbeat("vm1")["seq"].as_u64().unwrap()
}

/// Starts the migration with `extra` settings and waits until the
/// engine's progress says `phase`; the job's id.
fn start_until(a: &Agent, b: &Agent, extra: Value, phase: &str) -> String {
    let mut body = json!({"target": {"host": host(b), "address": peer_addr(b)}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = a.post("/v1/vms/vm1/migrations", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = a.get(&format!("/v1/migrations/{id}")).json();
        if v["progress"]["phase"] == phase {
            return id;
        }
        assert!(v["ended_at"].is_null(), "ended before {phase}: {v}");
        assert!(Instant::now() < deadline, "never {phase}: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The refused cancel, then the commit: the VM runs on B, whole.
fn refused_then_committed(a: &Agent, b: &Agent, id: &str, seq: u64, reason: &str) {
    let c = a.delete(&format!("/v1/migrations/{id}"));
    assert_eq!(c.status, 409, "{}", c.text());
    let body = c.json();
    assert_eq!(body["error"], "conflict", "{body}");
    assert!(body["reason"].as_str().unwrap().contains(reason), "{body}");
    let done = wait_job(a, id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    assert_eq!(a.get("/v1/vms/vm1").status, 404);
    assert_eq!(reserved(a, "ferryd_memory_reserved_bytes"), 0);
    assert_eq!(b.show("vm1")["state"], "running");
    let hb = b.heartbeat_after("vm1", seq, Duration::from_secs(30));
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    // Once it has ended, a cancel says so.
    let late = a.delete(&format!("/v1/migrations/{id}"));
    assert_eq!(late.status, 409, "{}", late.text());
    assert!(late.text().contains("has ended"), "{}", late.text());
}

#[test]
fn a_cancel_in_the_blackout_is_refused_and_the_migration_commits() {
    if !kvm_or_skip("a_cancel_in_the_blackout_is_refused_and_the_migration_commits") {
        return;
    }
    let fleet = Fleet::new("lateb");
    let a = agent("lateb-a", &fleet, "2G", false);
    let b = agent("lateb-b", &fleet, "2G", false);
    let seq = create(&a);
    // A downtime target far above the working set's send time: the
    // blackout follows the first pass and lasts about a second at this
    // cap, long enough to be seen.
    let id = start_until(
        &a,
        &b,
        json!({"bandwidth": 64u64 << 20, "downtime_ms": 60000.0}),
        "blackout",
    );
    refused_then_committed(&a, &b, &id, seq, "the blackout has begun");
}

#[test]
fn a_cancel_in_post_copy_is_refused_and_the_migration_commits() {
    if !kvm_or_skip("a_cancel_in_post_copy_is_refused_and_the_migration_commits") {
        return;
    }
    let fleet = Fleet::new("latep");
    let a = agent("latep-a", &fleet, "2G", false);
    let b = agent("latep-b", &fleet, "2G", false);
    let seq = create(&a);
    // About 5 s of pages pushed after the VM moved.
    let id = start_until(
        &a,
        &b,
        json!({"mode": "postcopy", "bandwidth": 64u64 << 20}),
        "postcopy",
    );
    refused_then_committed(&a, &b, &id, seq, "post-copy in progress");
}
