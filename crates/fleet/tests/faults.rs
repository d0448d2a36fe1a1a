//! Faults during a drain: a target that fails, migrations that fail or
//! miss their completion timeout; retries elsewhere, at most K times.

mod common;

use common::*;
use ferry_fleet::model::Health;
use ferry_fleet::plan::{EntryState, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::sim::audit;
use ferry_fleet::sim::migrator::{Fault, Outcome};
use ferry_fleet::time::Timestamp;

#[test]
fn a_target_that_fails_mid_drain_sends_its_migrations_back_and_they_retry_elsewhere() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 512),
        host("c", "r3", 256),
    ];
    let vms: Vec<_> = (0..6).map(|i| vm(&format!("v{i}"), "t", "a", 2)).collect();
    let policies = Policies::default().with_overrides("out=2,in=2").unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    // b has the most room: the first migrations go there.
    let mid = run_until(&mut s, Timestamp(0), 400);
    let to_b: Vec<String> = s
        .migrator()
        .record()
        .iter()
        .filter(|r| r.target == "b" && r.outcome == Outcome::Running)
        .map(|r| r.vm.clone())
        .collect();
    assert!(!to_b.is_empty(), "{:?}", s.migrator().record());
    s.migrator_mut().fail_host("b", mid.end);
    s.set_health("b", Health::Unreachable { since: mid.end })
        .unwrap();
    assert!(run_all(&mut s, mid.end).finished);

    let plan = s.plan(&id).unwrap();
    assert_eq!(plan.state, PlanState::Done);
    for e in &plan.entries {
        match &e.state {
            EntryState::Migrated { target, .. } => assert_eq!(target, "c", "{e:?}"),
            other => panic!("{} ended {other:?}", e.vm),
        }
    }
    for vm in &to_b {
        let e = plan.entries.iter().find(|e| &e.vm == vm).unwrap();
        assert_eq!(e.attempts, 2, "{e:?}");
        assert!(e.history[0].contains("target b failed"), "{:?}", e.history);
        assert_eq!(e.avoid, ["b"]);
    }
    // Nothing was committed on b, nothing twice, and the caps held.
    let rec = s.migrator().record();
    assert!(rec
        .iter()
        .all(|r| !(r.target == "b" && r.outcome == Outcome::Committed)));
    assert_eq!(
        rec.iter()
            .filter(|r| r.outcome == Outcome::Committed)
            .count(),
        6
    );
    assert!(audit(rec, &policies).violations.is_empty());
}

#[test]
fn a_degraded_target_has_its_inbound_migrations_aborted_by_the_scheduler() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 512),
        host("c", "r3", 256),
    ];
    let vms = vec![vm("v", "t", "a", 2)];
    let mut s = open(&hosts, &vms, &Policies::default());
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    let mid = run_until(&mut s, Timestamp(0), 200);
    assert_eq!(s.migrator().record()[0].target, "b");
    // Only the fleet knows: the migrator was not told.
    s.set_health(
        "b",
        Health::Degraded {
            reason: "PSU failure".into(),
        },
    )
    .unwrap();
    assert!(run_all(&mut s, mid.end).finished);
    let rec = s.migrator().record();
    assert_eq!(rec[0].outcome, Outcome::Cancelled);
    assert_eq!(
        (rec[1].target.as_str(), rec[1].outcome),
        ("c", Outcome::Committed)
    );
    let e = &s.plan(&id).unwrap().entries[0];
    assert!(
        e.history[0].contains("became degraded mid-migration"),
        "{:?}",
        e.history
    );
}

#[test]
fn failures_retry_elsewhere_at_most_k_times_then_are_reported() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r2", 128),
        host("d", "r2", 96),
        host("e", "r2", 80),
    ];
    let vms = vec![vm("unlucky", "t", "a", 2), vm("fine", "t", "a", 2)];
    let policies = Policies::default().with_overrides("attempts=3").unwrap();
    let mut s = open(&hosts, &vms, &policies);
    s.migrator_mut().inject("unlucky", &[Fault::FailHalfway; 5]);
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    assert!(run_all(&mut s, Timestamp(0)).finished);
    let plan = s.plan(&id).unwrap();
    let e = plan.entries.iter().find(|e| e.vm == "unlucky").unwrap();
    assert_eq!(e.state, EntryState::Failed);
    assert_eq!(e.attempts, 3);
    assert!(e
        .reason
        .as_deref()
        .unwrap()
        .starts_with("gave up after 3 attempts (the VM runs on a)"));
    // Three different targets were tried.
    let mut targets: Vec<&str> = s
        .migrator()
        .record()
        .iter()
        .filter(|r| r.vm == "unlucky")
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(targets.len(), 3);
    targets.sort_unstable();
    targets.dedup();
    assert_eq!(targets.len(), 3);
    let fine = plan.entries.iter().find(|e| e.vm == "fine").unwrap();
    assert!(matches!(fine.state, EntryState::Migrated { .. }));
    // The failed VM still runs on a, so a is not handed to maintenance.
    let a = s.fleet().host_ix("a").unwrap();
    assert_eq!(s.fleet().vms_on(a).count(), 1);
    assert_ne!(
        s.fleet().host(a).maintenance,
        ferry_fleet::model::Maintenance::InMaintenance
    );
}

#[test]
fn a_missed_completion_timeout_switches_to_postcopy_where_allowed_else_retries() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r2", 128),
    ];
    let mut postcopy = vm("postcopy-ok", "t", "a", 2);
    postcopy.migration.allow_postcopy = true;
    let vms = vec![postcopy, vm("precopy-only", "t", "a", 2)];
    let mut policies = Policies::default();
    policies.retries.completion_timeout_per_gib_ms = 1_000;
    policies.retries.min_completion_timeout_ms = 3_000;
    let mut s = open(&hosts, &vms, &policies);
    s.migrator_mut().inject("postcopy-ok", &[Fault::Stall]);
    s.migrator_mut().inject("precopy-only", &[Fault::Stall]);
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    assert!(run_all(&mut s, Timestamp(0)).finished);
    let plan = s.plan(&id).unwrap();
    let pc = plan.entries.iter().find(|e| e.vm == "postcopy-ok").unwrap();
    assert!(matches!(pc.state, EntryState::Migrated { .. }), "{pc:?}");
    assert_eq!(pc.attempts, 1);
    assert!(
        pc.history[0].contains("switched to post-copy"),
        "{:?}",
        pc.history
    );
    let pre = plan
        .entries
        .iter()
        .find(|e| e.vm == "precopy-only")
        .unwrap();
    assert!(matches!(pre.state, EntryState::Migrated { .. }), "{pre:?}");
    assert_eq!(pre.attempts, 2);
    assert!(
        pre.history[0].contains("missed its completion timeout of 3 s"),
        "{:?}",
        pre.history
    );
    let rec = s.migrator().record();
    let first = rec.iter().find(|r| r.vm == "precopy-only").unwrap();
    assert_eq!(first.outcome, Outcome::Cancelled);
}
