//! A `ferryd` killed with -9 in the middle of a migration over mutual
//! TLS, then started again (real KVM, two real agents). The source's: the
//! job is settled from what was written under the state directory. The
//! destination's: it takes back the receiving VMM it had started and
//! follows it to its end. Either way the VM ends in exactly one place,
//! running and verified there; the other host holds nothing of it (no
//! VMM, no record, no reservation).

mod common;

use std::time::{Duration, Instant};

use common::peers::{
    agent, cancel_and_wait, host, incoming_ended, keep_peer_addr, peer_addr, reserved, start_slow,
    wait_job, Fleet,
};
use common::{alive, kill9, kvm_or_skip, processes_mentioning, wait_gone};
use serde_json::{json, Value};

#[test]
fn source_agent_killed_mid_migration_settles_in_exactly_one_place() {
    if !kvm_or_skip("source_agent_killed_mid_migration_settles_in_exactly_one_place") {
        return;
    }
    let fleet = Fleet::new("kill");
    let mut a = agent("kill-a", &fleet, "2G", false);
    let b = agent("kill-b", &fleet, "2G", false);
    a.create_vm("vm1", "512M", "dirty:64:100:256");
    let before = a.heartbeat("vm1");

    // Slow enough (about 3 s for the first pass) to be killed in flight.
    let (id, _) = start_slow(&a, "vm1", &b, 128 << 20);
    let job_file = a.dir.path("state").join(format!("jobs/{id}.json"));
    assert!(
        job_file.exists(),
        "the job was not written down before the data plane"
    );
    a.kill9_then_start(|| std::thread::sleep(Duration::from_millis(300)));

    // The restarted agent knows the job and settles it.
    let settled = wait_job(&a, &id, Duration::from_secs(150));
    let on_a = a.get("/v1/vms/vm1");
    let on_b = b.get("/v1/vms/vm1");
    let seq = before["seq"].as_u64().unwrap();
    if settled["phase"] == "committed" {
        assert_eq!(on_a.status, 404, "committed, yet A has it: {}", on_a.text());
        assert_eq!(
            on_b.status,
            200,
            "committed, yet B lacks it: {}",
            on_b.text()
        );
        let hb = b.heartbeat_after("vm1", seq, Duration::from_secs(20));
        assert_eq!(hb["err"], 0, "{hb}");
        assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    } else {
        assert_eq!(on_b.status, 404, "aborted, yet B has it: {}", on_b.text());
        assert_eq!(on_a.status, 200, "aborted, yet A lacks it: {}", on_a.text());
        assert_eq!(on_a.json()["state"], "running", "{}", on_a.text());
        let hb = a.heartbeat_after("vm1", seq, Duration::from_secs(20));
        assert_eq!(hb["err"], 0, "{hb}");
    }
    let written: Value = serde_json::from_slice(&std::fs::read(&job_file).unwrap()).unwrap();
    assert_eq!(written["phase"], settled["phase"], "{written}");
    assert!(
        !a.dir
            .path("state")
            .join(format!("jobs/{id}.token"))
            .exists(),
        "the token file outlived its job"
    );
    eprintln!("settled after the kill: {}", settled["phase"]);
}

/// The receiving VMM of `agent` (a `ferry receive` under its directory).
fn receiver_of(agent: &common::Agent) -> Option<u32> {
    processes_mentioning(&agent.needle())
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == b"receive"))
                .unwrap_or(false)
        })
}

#[test]
fn source_agent_killed_and_the_migration_failing_meanwhile_keeps_the_vm_on_the_source() {
    if !kvm_or_skip(
        "source_agent_killed_and_the_migration_failing_meanwhile_keeps_the_vm_on_the_source",
    ) {
        return;
    }
    let fleet = Fleet::new("killab");
    let mut a = agent("killab-a", &fleet, "2G", false);
    let b = agent("killab-b", &fleet, "2G", false);
    a.create_vm("vm1", "512M", "dirty:64:100:256");
    let before = a.heartbeat("vm1");
    // About 10 s of first pass: the destination dies well before the end.
    let (id, _) = start_slow(&a, "vm1", &b, 32 << 20);
    let receiver = receiver_of(&b).expect("B's receiving VMM");
    // The source agent dies, then the destination's receiver: the source
    // VMM's migration fails while no agent watches it.
    a.kill9_then_start(|| {
        kill9(receiver);
        std::thread::sleep(Duration::from_millis(500));
    });
    let settled = wait_job(&a, &id, Duration::from_secs(150));
    assert_eq!(settled["phase"], "failed", "{settled}");
    assert!(
        settled["error"]
            .as_str()
            .unwrap()
            .contains("runs on the source"),
        "{settled}"
    );
    assert_eq!(b.get("/v1/vms/vm1").status, 404);
    let on_a = a.show("vm1");
    assert_eq!(on_a["state"], "running", "{on_a}");
    let hb = a.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap() + 5,
        Duration::from_secs(30),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    // And it can still be migrated.
    let r = a.post(
        "/v1/vms/vm1/migrations",
        Some(json!({"target": {"host": host(&b), "address": peer_addr(&b)}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

/// Waits (bounded) until no process but the agent itself mentions
/// `agent`'s directory.
fn wait_no_vmm(agent: &common::Agent, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut left = processes_mentioning(&agent.needle());
        left.retain(|&pid| pid != agent.pid());
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: processes {left:?} remain"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM moved to `to` and nothing of it is left on `from`.
fn assert_only_on(to: &common::Agent, from: &common::Agent, seq: u64) {
    assert_eq!(from.get("/v1/vms/vm1").status, 404);
    assert_eq!(from.get("/v1/vms").json(), json!([]));
    wait_no_vmm(from, "the host without the VM");
    assert_eq!(reserved(from, "ferryd_memory_reserved_bytes"), 0);
    assert_eq!(reserved(from, "ferryd_memory_reserved_incoming_bytes"), 0);
    let shown = to.show("vm1");
    assert_eq!(shown["state"], "running", "{shown}");
    let listed = to.get("/v1/vms").json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(reserved(to, "ferryd_memory_reserved_bytes"), 512 << 20);
    assert_eq!(reserved(to, "ferryd_memory_reserved_incoming_bytes"), 0);
    let hb = to.heartbeat_after("vm1", seq + 5, Duration::from_secs(30));
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
}

#[test]
fn destination_agent_killed_mid_migration_settles_in_exactly_one_place() {
    if !kvm_or_skip("destination_agent_killed_mid_migration_settles_in_exactly_one_place") {
        return;
    }
    let fleet = Fleet::new("dkill");
    let a = agent("dkill-a", &fleet, "2G", false);
    let mut b = agent("dkill-b", &fleet, "2G", false);
    keep_peer_addr(&b);
    a.create_vm("vm1", "512M", "dirty:64:100:256");
    let before = a.heartbeat("vm1");
    let seq = before["seq"].as_u64().unwrap();

    // About 3 s of first pass: B's agent dies and comes back within it.
    let (id, incoming) = start_slow(&a, "vm1", &b, 128 << 20);
    assert!(
        b.dir
            .path("state")
            .join(format!("incoming/{incoming}.json"))
            .exists(),
        "B did not write its incoming migration down before the data plane"
    );
    let receiver = receiver_of(&b).expect("B's receiving VMM");
    b.kill9_then_start(|| {
        std::thread::sleep(Duration::from_millis(300));
        assert!(alive(receiver), "the receiver died with its agent");
    });

    let settled = wait_job(&a, &id, Duration::from_secs(150));
    let on_b = incoming_ended(&b, &incoming);
    eprintln!(
        "after B's kill: the job {}, B's incoming migration {}",
        settled["phase"], on_b["phase"]
    );
    if settled["phase"] == "committed" {
        assert_eq!(on_b["phase"], "committed", "{on_b}");
        assert_only_on(&b, &a, seq);
        // B's VM is B's: it supervises the receiver as the VM's VMM.
        assert_eq!(b.show("vm1")["pid"], receiver, "{}", b.show("vm1"));
    } else {
        assert_eq!(settled["phase"], "failed", "{settled}");
        assert_ne!(on_b["phase"], "committed", "{on_b}");
        wait_gone(receiver, Duration::from_secs(30));
        assert_only_on(&a, &b, seq);
    }
    // Whichever host has it supervises it: deleting it there stops its
    // VMM and frees its reservation.
    let owner = if settled["phase"] == "committed" {
        &b
    } else {
        &a
    };
    let r = owner.delete("/v1/vms/vm1");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_no_vmm(owner, "after the delete");
    assert_eq!(reserved(owner, "ferryd_memory_reserved_bytes"), 0);
}

#[test]
fn destination_agent_killed_and_the_migration_cancelled_meanwhile_releases_everything() {
    if !kvm_or_skip(
        "destination_agent_killed_and_the_migration_cancelled_meanwhile_releases_everything",
    ) {
        return;
    }
    let fleet = Fleet::new("dkillc");
    let a = agent("dkillc-a", &fleet, "2G", false);
    let mut b = agent("dkillc-b", &fleet, "2G", false);
    keep_peer_addr(&b);
    a.create_vm("vm1", "512M", "dirty:64:100:256");
    let seq = a.heartbeat("vm1")["seq"].as_u64().unwrap();
    // About 10 s of first pass: cancelled well before the end.
    let (id, incoming) = start_slow(&a, "vm1", &b, 32 << 20);
    let receiver = receiver_of(&b).expect("B's receiving VMM");
    // The source cannot tell B's agent: only its receiver learns it. It
    // tries, with a bounded backoff (about 30 s), and the job says so.
    b.kill9_then_start(|| cancel_and_wait(&a, &id));
    let job = a.get(&format!("/v1/migrations/{id}")).json();
    assert_eq!(job["destination_told"], false, "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("could not be told"),
        "{job}"
    );
    let on_b = incoming_ended(&b, &incoming);
    assert!(
        ["failed", "aborted"].contains(&on_b["phase"].as_str().unwrap()),
        "{on_b}"
    );
    wait_gone(receiver, Duration::from_secs(30));
    assert_only_on(&a, &b, seq);
    assert!(
        !b.dir.path("state").join("vms/vm1").exists(),
        "B kept the VM's directory"
    );
}

#[test]
fn an_abort_to_a_destination_agent_that_is_down_is_retried_until_it_is_back() {
    if !kvm_or_skip("an_abort_to_a_destination_agent_that_is_down_is_retried_until_it_is_back") {
        return;
    }
    let fleet = Fleet::new("dretry");
    let a = agent("dretry-a", &fleet, "2G", false);
    let mut b = agent("dretry-b", &fleet, "2G", false);
    keep_peer_addr(&b);
    a.create_vm("vm1", "512M", "dirty:64:100:256");
    let seq = a.heartbeat("vm1")["seq"].as_u64().unwrap();
    // About 10 s of first pass: cancelled well before the end.
    let (id, incoming) = start_slow(&a, "vm1", &b, 32 << 20);
    let receiver = receiver_of(&b).expect("B's receiving VMM");
    b.kill9();
    let c = a.delete(&format!("/v1/migrations/{id}"));
    assert_eq!(c.status, 202, "{}", c.text());
    // The first tries find nobody; B is back before the last.
    std::thread::sleep(Duration::from_secs(3));
    b.start();
    let done = wait_job(&a, &id, Duration::from_secs(60));
    assert_eq!(done["phase"], "cancelled", "{done}");
    assert_eq!(done["destination_told"], true, "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("was told"),
        "{done}"
    );
    let on_b = incoming_ended(&b, &incoming);
    assert!(
        ["failed", "aborted"].contains(&on_b["phase"].as_str().unwrap()),
        "{on_b}"
    );
    wait_gone(receiver, Duration::from_secs(30));
    assert_only_on(&a, &b, seq);
}
