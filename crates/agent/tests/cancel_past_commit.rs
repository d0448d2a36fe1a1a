//! A cancel that comes too late (real KVM, two real agents over mutual
//! TLS): once the engine is in its blackout, or the VM runs on the
//! destination in post-copy, `DELETE /v1/migrations/{id}` is refused with
//! 409 and the reason, and the migration commits: the VM ends on the
//! destination, running and verified, nothing of it left on the source.
//! And a cancel right at the engine's point of no return is exact: 202
//! and the VM stays on the source, or 409 and it commits, never both.

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

/// What a storm of cancels around the end of a first pass got.
#[derive(Debug)]
struct Storm {
    offset_ms: i64,
    status: u16,
    accepted: u32,
    phase: String,
}

/// The engine's clock (its progress lines' `elapsed_ms`) on this one:
/// when the engine started, from the tightest of the first progress
/// lines (each is read a little after it was written).
fn engine_start(a: &Agent, id: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut best: Option<Instant> = None;
    let mut seen = 0;
    while seen < 20 {
        let v = a.get(&format!("/v1/migrations/{id}")).json();
        if let Some(ms) = v["progress"]["elapsed_ms"].as_f64() {
            let t0 = Instant::now()
                .checked_sub(Duration::from_secs_f64(ms / 1e3))
                .unwrap();
            best = Some(best.map_or(t0, |b: Instant| b.min(t0)));
            seen += 1;
        }
        assert!(v["ended_at"].is_null(), "ended too soon: {v}");
        assert!(Instant::now() < deadline, "no progress: {v}");
        std::thread::sleep(Duration::from_millis(7));
    }
    best.unwrap()
}

/// When live round `round` will end, from the latest progress lines: what
/// is left of it at the cap, on the engine's clock. Waits for a line
/// close to its end (under 8 MiB left), or for a later phase.
fn round_end(a: &Agent, id: &str, t0: Instant, cap: f64, round: u32) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = a.get(&format!("/v1/migrations/{id}")).json();
        let p = &v["last_progress"];
        let elapsed = Duration::from_secs_f64(p["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3);
        let at = p["round"].as_u64().unwrap_or(0);
        if p["phase"] == "round" && at == u64::from(round) {
            let left = p["remaining_bytes"].as_f64().unwrap_or(f64::MAX);
            if left < (8 << 20) as f64 {
                return t0 + elapsed + Duration::from_secs_f64(left / cap);
            }
        } else if at > u64::from(round) || p["phase"] == "blackout" {
            // Past that round already.
            return t0 + elapsed;
        }
        assert!(v["ended_at"].is_null(), "ended too soon: {v}");
        assert!(Instant::now() < deadline, "no end of a first pass: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends DELETEs one after the other from `at` until the job has ended;
/// the first verdict, and how many 202s came (every one of them must
/// come before the first refusal).
fn cancel_storm(a: &Agent, id: &str, at: Instant) -> (u16, u32) {
    while Instant::now() < at {
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut first, mut accepted, mut refused) = (None, 0, false);
    loop {
        let r = a.delete(&format!("/v1/migrations/{id}"));
        let text = r.text();
        match r.status {
            202 => {
                assert!(!refused, "a 202 after a refusal: {text}");
                accepted += 1;
            }
            409 if text.contains("cannot be cancelled") => {
                assert_eq!(accepted, 0, "a refusal after an accepted cancel: {text}");
                refused = true;
            }
            409 if text.contains("has ended") => {
                return (first.expect("a verdict first"), accepted)
            }
            other => panic!("DELETE answered {other}: {text}"),
        }
        first.get_or_insert(r.status);
        assert!(Instant::now() < deadline, "the job never ended");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_cancel_at_the_point_of_no_return_either_keeps_the_vm_or_is_refused_never_both() {
    if !kvm_or_skip("a_cancel_at_the_point_of_no_return_either_keeps_the_vm_or_is_refused") {
        return;
    }
    let fleet = Fleet::new("race");
    let hosts = [
        agent("race-a", &fleet, "2G", false),
        agent("race-b", &fleet, "2G", false),
    ];
    // 16 MiB rewritten at 50 MiB/s, 64 MiB filled: a first pass of about
    // 2.5 s at 32 MiB/s, then (the target far above it) the blackout.
    let r = hosts[0].post(
        "/v1/vms",
        Some(json!({"id": "vm1",
            "definition": {"mem_bytes": 256u64 << 20, "workload": "dirty:16:50:64"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let cap = 32u64 << 20;
    let settings = json!({"bandwidth": cap, "downtime_ms": 60000.0});
    let mut here = 0;
    let mut storms = Vec::new();
    // The first pass leaves the whole working set dirty, which one more
    // round at the cap is worth sending live; the second round's end
    // finds it all dirty again, so the blackout follows it. Around that
    // instant: before it the cancel wins, well after it the blackout has
    // begun; between, either may (a third round only adds a 202).
    for offset_ms in [-300i64, -20, -5, 0, 2, 4, 6, 8, 12, 25, 300] {
        let (src, dst) = (&hosts[here], &hosts[1 - here]);
        let seq = src.heartbeat("vm1")["seq"].as_u64().unwrap();
        let id = start_on(src, dst, settings.clone());
        let t0 = engine_start(src, &id);
        let end = round_end(src, &id, t0, cap as f64, 2);
        let at = if offset_ms >= 0 {
            end + Duration::from_millis(offset_ms as u64)
        } else {
            end.checked_sub(Duration::from_millis(offset_ms.unsigned_abs()))
                .unwrap()
        };
        let (status, accepted) = cancel_storm(src, &id, at);
        let done = wait_job(src, &id, Duration::from_secs(120));
        let phase = done["phase"].as_str().unwrap().to_owned();
        storms.push(Storm {
            offset_ms,
            status,
            accepted,
            phase: phase.clone(),
        });
        let (owner, other) = if status == 202 {
            assert_eq!(phase, "cancelled", "a 202 and then: {done}");
            (src, dst)
        } else {
            assert_eq!(phase, "committed", "a 409 and then: {done}");
            here = 1 - here;
            (dst, src)
        };
        assert_eq!(owner.show("vm1")["state"], "running");
        assert_eq!(other.get("/v1/vms/vm1").status, 404, "the VM in two places");
        let hb = owner.heartbeat_after("vm1", seq, Duration::from_secs(30));
        assert_eq!(hb["err"], 0, "{hb}");
        assert_eq!(hb["sequence_breaks"], 0, "{hb}");
        // The VM's memory reserved where it runs, and nowhere else (the
        // other host releases when its receiver has ended, which may come
        // just after the source's job did).
        let released = Instant::now() + Duration::from_secs(30);
        while reserved(other, "ferryd_memory_reserved_bytes") != 0 {
            assert!(Instant::now() < released, "a reservation left behind");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(reserved(owner, "ferryd_memory_reserved_bytes"), 256 << 20);
    }
    eprintln!("cancel storms: {storms:#?}");
    let refused = storms.iter().filter(|s| s.status == 409).count();
    eprintln!(
        "{} accepted, {refused} refused (offsets {:?} ms, 202s {:?}, phases {:?})",
        storms.len() - refused,
        storms.iter().map(|s| s.offset_ms).collect::<Vec<_>>(),
        storms.iter().map(|s| s.accepted).collect::<Vec<_>>(),
        storms.iter().map(|s| s.phase.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(hosts[here].delete("/v1/vms/vm1").status, 200);
}

/// Starts vm1's migration from `a` to `b` with `extra` settings; its id.
fn start_on(a: &Agent, b: &Agent, extra: Value) -> String {
    let mut body = json!({"target": {"host": host(b), "address": peer_addr(b)}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = a.post("/v1/vms/vm1/migrations", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}
