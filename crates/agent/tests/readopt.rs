//! VMs outlive their agent: kill -9 ferryd (or stop it with SIGTERM) and
//! start it again, and it re-adopts the same VMM processes, whose guests
//! never noticed; a VMM that died while no agent ran is reported failed.

mod common;

use std::time::Duration;

use common::{alive, kill9, kvm_or_skip, wait_gone, Agent};
use serde_json::Value;

fn seq(hb: &Value) -> u64 {
    hb["seq"].as_u64().unwrap()
}

#[test]
fn agent_killed_and_restarted_readopts_its_vms() {
    if !kvm_or_skip("agent_killed_and_restarted_readopts_its_vms") {
        return;
    }
    let mut agent = Agent::new("readopt", "1G", 4);
    let keep = agent.create_vm("keep", "64M", "dirty:16:50");
    let doomed = agent.create_vm("doomed", "64M", "dirty:8:20");
    let paused = agent.create_vm("held", "64M", "idle");
    let keep_pid = keep["pid"].as_u64().unwrap() as u32;
    let doomed_pid = doomed["pid"].as_u64().unwrap() as u32;
    let held_pid = paused["pid"].as_u64().unwrap() as u32;
    assert_eq!(agent.post("/v1/vms/held/pause", None).status, 200);
    let before = agent.heartbeat_after("keep", 2, Duration::from_secs(10));

    // kill -9 the agent: every VM runs on.
    agent.kill9();
    assert!(alive(keep_pid) && alive(doomed_pid) && alive(held_pid));
    // One VMM dies while no agent watches.
    kill9(doomed_pid);
    wait_gone(doomed_pid, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));

    // The next agent replaces the stale socket and re-adopts.
    agent.start();
    let keep_now = agent.show("keep");
    assert_eq!(keep_now["state"], "running", "{keep_now}");
    assert_eq!(
        keep_now["pid"].as_u64().unwrap() as u32,
        keep_pid,
        "never restarted"
    );
    let hb = agent.heartbeat_after("keep", seq(&before) + 5, Duration::from_secs(10));
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(
        hb["sequence_breaks"], 0,
        "the guest's heartbeat never broke: {hb}"
    );

    let doomed_now = agent.show("doomed");
    assert_eq!(doomed_now["state"], "failed", "{doomed_now}");
    let reason = doomed_now["reason"].as_str().unwrap();
    assert!(
        reason.contains("died while ferryd was down") && reason.contains(&doomed_pid.to_string()),
        "{reason}"
    );
    assert!(doomed_now["live"].is_null());

    let held_now = agent.show("held");
    assert_eq!(held_now["state"], "paused", "{held_now}");
    assert_eq!(held_now["pid"].as_u64().unwrap() as u32, held_pid);
    assert_eq!(agent.post("/v1/vms/held/resume", None).status, 200);

    // The ledger counts the adopted VMs, not the failed one.
    let m = agent.get("/metrics").text();
    assert!(
        m.contains(&format!("ferryd_memory_reserved_bytes {}", 128 << 20)),
        "{m}"
    );
    assert!(m.contains("ferryd_vms{state=\"failed\"} 1"), "{m}");

    // An adopted VMM that dies now is noticed and recorded.
    kill9(held_pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = agent.show("held");
        if v["state"] == "failed" {
            assert!(v["reason"].as_str().unwrap().contains("exited"), "{v}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the death of held went unnoticed: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM leaves the VMs running too, and a third agent adopts again.
    let status = agent.terminate();
    assert!(status.success(), "ferryd's SIGTERM exit: {status}");
    assert!(!agent.socket.exists(), "a clean stop removes its socket");
    assert!(
        alive(keep_pid),
        "SIGTERM to the agent must not stop its VMs"
    );
    let before = agent.heartbeat_after_restart(&keep_pid);
    let hb = agent.heartbeat_after("keep", seq(&before) + 2, Duration::from_secs(10));
    assert_eq!(hb["err"], 0);
    assert_eq!(hb["sequence_breaks"], 0);
    assert_eq!(agent.show("keep")["pid"].as_u64().unwrap() as u32, keep_pid);

    // A failed VM is deleted like any other; so is the adopted one.
    assert_eq!(agent.delete("/v1/vms/doomed").status, 200);
    assert_eq!(agent.delete("/v1/vms/held").status, 200);
    assert_eq!(agent.delete("/v1/vms/keep").status, 200);
    assert!(!alive(keep_pid), "delete stops an adopted VMM too");
}

trait Restart {
    fn heartbeat_after_restart(&mut self, pid: &u32) -> Value;
}

impl Restart for Agent {
    /// Starts the agent again and reads the adopted VM's heartbeat.
    fn heartbeat_after_restart(&mut self, pid: &u32) -> Value {
        self.start();
        assert_eq!(self.show("keep")["pid"].as_u64().unwrap() as u32, *pid);
        self.heartbeat("keep")
    }
}

/// A VMM that lives but does not answer when the agent comes back (here:
/// stopped with SIGSTOP) is never killed, only reported failed, still
/// counted against capacity, and still stopped by delete.
#[test]
fn a_mute_vmm_is_reported_failed_but_left_alone() {
    if !kvm_or_skip("a_mute_vmm_is_reported_failed_but_left_alone") {
        return;
    }
    let mut agent = Agent::new("mute", "1G", 4);
    let vm = agent.create_vm("mute", "64M", "idle");
    let pid = vm["pid"].as_u64().unwrap() as u32;
    agent.kill9();
    // SAFETY: kill(2) with a valid signal on the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    agent.start();
    let v = agent.show("mute");
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("alive but its API socket does not answer"),
        "{v}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pid),
        "the agent must not kill a VMM it could not adopt"
    );
    let m = agent.get("/metrics").text();
    assert!(
        m.contains(&format!("ferryd_memory_reserved_bytes {}", 64 << 20)),
        "{m}"
    );
    assert_eq!(agent.delete("/v1/vms/mute").status, 200);
    assert!(!alive(pid));
}
