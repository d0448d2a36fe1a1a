//! A plan outlives its scheduler: restarted from the store it goes on,
//! and no VM moves twice. Cancel and resume; fenced writes.

mod common;

use common::*;
use ferry_fleet::plan::{EntryState, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::{Scheduler, SchedulerError};
use ferry_fleet::sim::migrator::Outcome;
use ferry_fleet::sim::{audit, generate, FleetSpec};
use ferry_fleet::store::embedded::RedbBackend;
use ferry_fleet::store::StoreError;
use ferry_fleet::time::Timestamp;

#[test]
fn a_restarted_scheduler_resumes_the_plan_from_the_store_and_moves_no_vm_twice() {
    let dir = tmp_dir("resume");
    let path = dir.join("fleet.redb");
    let spec = FleetSpec {
        hosts: 60,
        vms: 1200,
        ..FleetSpec::default()
    };
    let (hosts, vms, _) = generate(&spec);
    let policies = Policies::default().with_overrides("out=1,in=1").unwrap();
    let mut s = open_on(RedbBackend::open(&path).unwrap(), &hosts, &vms, &policies);
    let id = s.prepare_drain("h0005", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    let mid = run_until(&mut s, Timestamp(0), 3_000);
    assert!(!mid.finished);
    let before = s.plan(&id).unwrap().clone();
    let in_flight = before
        .entries
        .iter()
        .filter(|e| matches!(e.state, EntryState::Migrating { .. }))
        .count();
    let moved = before
        .entries
        .iter()
        .filter(|e| matches!(e.state, EntryState::Migrated { .. }))
        .count();
    assert!(in_flight > 0 && moved > 0, "{:?}", before.counts());
    // The scheduler dies; the hosts (the migrator) live on.
    let migrator = s.into_migrator();
    let mut s = Scheduler::open(RedbBackend::open(&path).unwrap(), migrator, None).unwrap();
    assert_eq!(
        s.plan(&id).unwrap(),
        &before,
        "the stored plan is the one in memory"
    );
    assert!(run_all(&mut s, mid.end).finished);

    let plan = s.plan(&id).unwrap();
    assert_eq!(plan.state, PlanState::Done);
    let rec = s.migrator().record();
    for e in &plan.entries {
        let n = rec.iter().filter(|r| r.vm == e.vm).count();
        match e.state {
            EntryState::Migrated { .. } => assert_eq!(n, 1, "{} migrated {n} times", e.vm),
            EntryState::Terminated { .. } => assert_eq!(n, 0),
            ref other => panic!("{} {other:?}", e.vm),
        }
    }
    assert!(rec.iter().all(|r| r.outcome == Outcome::Committed));
    assert!(audit(rec, &policies).violations.is_empty());
    // The store agrees: every VM record names its new host.
    let stored = s.store().vms().unwrap();
    for e in &plan.entries {
        let v = stored.iter().find(|v| v.value.id == e.vm).unwrap();
        if let EntryState::Migrated { target, .. } = &e.state {
            assert_eq!(&v.value.host, target);
        }
    }
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_cancelled_drain_stops_moving_and_resumes_where_it_stopped() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 256),
    ];
    let vms: Vec<_> = (0..8).map(|i| vm(&format!("v{i}"), "t", "a", 1)).collect();
    let policies = Policies::default().with_overrides("out=2").unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    let mid = run_until(&mut s, Timestamp(0), 1_500);
    s.cancel(&id, mid.end).unwrap();
    let plan = s.plan(&id).unwrap().clone();
    assert_eq!(plan.state, PlanState::Cancelled);
    assert!(plan
        .entries
        .iter()
        .all(|e| matches!(e.state, EntryState::Migrated { .. } | EntryState::Cancelled)));
    let a = s.fleet().host_ix("a").unwrap();
    assert_eq!(
        s.fleet().host(a).maintenance,
        ferry_fleet::model::Maintenance::None
    );
    let started = s.migrator().record().len();
    run_until(&mut s, mid.end, mid.end.ms() + 3_000);
    assert_eq!(
        s.migrator().record().len(),
        started,
        "a cancelled plan starts nothing"
    );
    assert!(s
        .migrator()
        .record()
        .iter()
        .any(|r| r.outcome == Outcome::Cancelled));
    // A second cancel, or executing it again, is refused.
    assert!(matches!(
        s.cancel(&id, mid.end).unwrap_err(),
        SchedulerError::WrongState { .. }
    ));
    assert!(s.execute(&id, mid.end).is_err());

    let t = Timestamp(mid.end.ms() + 3_000);
    s.resume(&id, t).unwrap();
    assert!(run_all(&mut s, t).finished);
    let plan = s.plan(&id).unwrap();
    assert_eq!(plan.state, PlanState::Done);
    let rec = s.migrator().record();
    for e in &plan.entries {
        let commits = rec
            .iter()
            .filter(|r| r.vm == e.vm && r.outcome == Outcome::Committed)
            .count();
        assert_eq!(commits, 1, "{}", e.vm);
    }
}

#[test]
fn a_scheduler_that_lost_its_lease_cannot_write() {
    let hosts = vec![host("a", "r1", 64), host("b", "r2", 256)];
    let mut s = open(&hosts, &[vm("v", "t", "a", 1)], &Policies::default());
    s.step_down().unwrap();
    let e = s.prepare_drain("a", Timestamp(0)).unwrap_err();
    assert!(
        matches!(e, SchedulerError::Store(StoreError::Fenced(_))),
        "{e}"
    );
}
