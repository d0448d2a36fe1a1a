//! What the tests that drive a fleet from outside share: bounded waits on
//! what its store holds (hosts alive, VMs on record, a plan done), and the
//! operator's `ferry` command run with what it printed shown. Included by
//! path in crates/agent's `fleet_drain` (real agents on a store file) and
//! crates/ferry's `fleet_serve` (`ferry` processes on etcd).

// Each test file uses some of it.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_fleet::hosts;
use ferry_fleet::plan::{Plan, PlanState};
use ferry_fleet::store::{Backend, FleetStore};

/// Polls `f` every 100 ms for at most `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (at most `limit`) until `hosts` are registered and alive and
/// `vms` are on record, running, on host `on`.
pub fn wait_registered<B: Backend>(
    b: &B,
    hosts: &[impl AsRef<str>],
    vms: &[&str],
    on: &str,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let alive = hosts::liveness(b).unwrap();
        let stored = FleetStore::new(b).vms().unwrap();
        let hosts_up = hosts
            .iter()
            .all(|h| alive.get(h.as_ref()).copied() == Some(true));
        let vms_in = vms.iter().all(|v| {
            stored
                .iter()
                .any(|s| s.value.id == *v && s.value.host == on && s.value.is_running())
        });
        if hosts_up && vms_in {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never saw every host and VM: alive {alive:?}, vms {:?}",
            stored
                .iter()
                .map(|s| (&s.value.id, &s.value.host))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Plan `id` as the store holds it.
pub fn stored_plan<B: Backend>(b: &B, id: &str) -> Plan {
    FleetStore::new(b)
        .plan_records()
        .unwrap()
        .into_iter()
        .map(|s| s.plan)
        .find(|p| p.id == id)
        .expect("the plan is in the store")
}

/// Waits (at most `limit`) until plan `id` is done and returns it;
/// `meanwhile` sees the plan at every poll before that (a test kills its
/// scheduler there). `what` names the wait when it fails, with each
/// entry's state and reason.
pub fn wait_plan_done<B: Backend>(
    b: &B,
    id: &str,
    limit: Duration,
    what: &str,
    mut meanwhile: impl FnMut(&Plan),
) -> Plan {
    let deadline = Instant::now() + limit;
    loop {
        let p = stored_plan(b, id);
        if p.state == PlanState::Done {
            return p;
        }
        meanwhile(&p);
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}",
            p.entries
                .iter()
                .map(|e| (&e.vm, &e.state, &e.reason))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the operator's `ferry` command to its end and prints it with its
/// status and output (a failing test shows what the operator saw).
pub fn run_shown(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run ferry");
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    println!(
        "$ ferry {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
