//! A VM's life through the agent, on real KVM: create, heartbeat, pause,
//! resume, snapshot, delete; the events and the audit log that go with it.

mod common;

use std::time::{Duration, Instant};

use common::{alive, kvm_or_skip, Agent};
use serde_json::{json, Value};

fn seq(hb: &Value) -> u64 {
    hb["seq"].as_u64().unwrap()
}

#[test]
fn create_pause_resume_snapshot_delete() {
    if !kvm_or_skip("create_pause_resume_snapshot_delete") {
        return;
    }
    let agent = Agent::new("life", "1G", 4);
    let events = agent.client.events().expect("follow /v1/events");

    let created = agent.create_vm("vm1", "64M", "dirty:16:50");
    assert_eq!(created["state"], "running");
    let pid = created["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));

    // Running: the heartbeat advances, the guest's checks pass.
    let first = agent.heartbeat("vm1");
    let later = agent.heartbeat_after("vm1", seq(&first) + 3, Duration::from_secs(10));
    assert_eq!(later["err"], 0, "{later}");
    assert_eq!(later["sequence_breaks"], 0, "{later}");
    let view = agent.show("vm1");
    assert!(view["live"]["uptime_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(view["live"]["paused"], false);

    // Pause: the heartbeat stops.
    let r = agent.post("/v1/vms/vm1/pause", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused");
    std::thread::sleep(Duration::from_millis(150));
    let at_pause = agent.heartbeat("vm1");
    std::thread::sleep(Duration::from_millis(800));
    let still = agent.heartbeat("vm1");
    assert_eq!(seq(&at_pause), seq(&still), "a paused guest must not beat");
    assert_eq!(agent.show("vm1")["live"]["paused"], true);
    assert_eq!(agent.show("vm1")["state"], "paused");

    // A paused VM is not paused again, nor snapshotted.
    assert_eq!(agent.post("/v1/vms/vm1/pause", None).status, 409);
    let snap = agent.dir.path("vm1.snap");
    let r = agent.post("/v1/vms/vm1/snapshot", Some(json!({"path": snap})));
    assert_eq!(r.status, 409, "{}", r.text());

    // Resume: the heartbeat continues, its sequence unbroken.
    let r = agent.post("/v1/vms/vm1/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    let resumed = agent.heartbeat_after("vm1", seq(&still) + 2, Duration::from_secs(10));
    assert_eq!(resumed["sequence_breaks"], 0, "sequence broke: {resumed}");
    assert_eq!(resumed["err"], 0);
    // The pause shows as the stall the guest measured itself.
    assert!(
        resumed["max_stall_us"].as_u64().unwrap() >= 700_000,
        "the guest should have seen the pause as a stall: {resumed}"
    );
    assert_eq!(agent.post("/v1/vms/vm1/resume", None).status, 409);

    // Snapshot: a file, and the VM runs on.
    let r = agent.post("/v1/vms/vm1/snapshot", Some(json!({"path": snap})));
    assert_eq!(r.status, 200, "{}", r.text());
    let size = std::fs::metadata(&snap).expect("snapshot file").len();
    assert!(
        size > 16 << 20,
        "the snapshot holds the working set: {size} bytes"
    );
    assert_eq!(r.json()["file_bytes"].as_u64().unwrap(), size);
    let after = agent.heartbeat_after("vm1", seq(&resumed) + 2, Duration::from_secs(10));
    assert_eq!(after["err"], 0);
    assert_eq!(after["sequence_breaks"], 0);

    // Metrics count it.
    let m = agent.get("/metrics").text();
    assert!(m.contains("ferryd_vms{state=\"running\"} 1"), "{m}");
    assert!(
        m.contains(&format!("ferryd_memory_reserved_bytes {}", 64 << 20)),
        "{m}"
    );
    assert!(m.contains("ferryd_memory_capacity_bytes 1073741824"), "{m}");
    assert!(m.contains("ferryd_vcpus_reserved 1"), "{m}");

    // Delete: the process stops, the record goes.
    let r = agent.delete("/v1/vms/vm1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!alive(pid), "delete must stop the VMM");
    assert_eq!(agent.get("/v1/vms/vm1").status, 404);
    assert_eq!(agent.get("/v1/vms").json(), json!([]));
    let m = agent.get("/metrics").text();
    assert!(m.contains("ferryd_memory_reserved_bytes 0"), "{m}");

    // Every change is in the audit log, with who asked.
    let audit = agent.audit_lines();
    let actions: Vec<(String, String)> = audit
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("POST /v1/vms", "ok"),
        ("POST /v1/vms/{id}/pause", "ok"),
        ("POST /v1/vms/{id}/pause", "refused"),
        ("POST /v1/vms/{id}/snapshot", "refused"),
        ("POST /v1/vms/{id}/resume", "ok"),
        ("POST /v1/vms/{id}/snapshot", "ok"),
        ("DELETE /v1/vms/{id}", "ok"),
    ] {
        assert!(
            actions.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} missing from the audit log: {actions:?}"
        );
    }
    // SAFETY: getuid(2) has no preconditions.
    let me = unsafe { libc::getuid() };
    assert!(audit
        .iter()
        .all(|a| a["who"]["uid"] == me && a["vm"] == "vm1"));

    // And the same went out as events, with the state changes.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => {
                seen.push(e);
                let audits = seen.iter().filter(|e| e["type"] == "audit").count();
                if audits == audit.len() && seen.iter().any(|e| e["type"] == "vm_deleted") {
                    break;
                }
            }
            Err(_) => continue,
        }
    }
    let states: Vec<&str> = seen
        .iter()
        .filter(|e| e["type"] == "vm_state")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["creating", "running", "paused", "running"],
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|e| e["type"] == "audit").count(),
        audit.len()
    );
    assert!(seen
        .iter()
        .any(|e| e["type"] == "vm_deleted" && e["vm"] == "vm1"));
}
