//! Two schedulers against one real etcd: one leads; when it dies (its
//! lease lapses) the other takes over within the lease's TTL and finishes
//! the drain, moving no VM twice; the deposed leader's writes are refused.
//! Hosts register under leases; a host whose lease lapsed is unreachable.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use common::*;
use ferry_fleet::hosts;
use ferry_fleet::leader::{Campaign, Candidate};
use ferry_fleet::model::Health;
use ferry_fleet::plan::{EntryState, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::{Scheduler, SchedulerError};
use ferry_fleet::sim::migrator::Outcome;
use ferry_fleet::sim::SimMigrator;
use ferry_fleet::store::etcd::{EtcdBackend, DEFAULT_PREFIX};
use ferry_fleet::store::{Backend, FleetStore, StoreError};
use ferry_fleet::time::Timestamp;

const TTL_MS: u64 = 2_000;

#[test]
fn a_follower_takes_over_a_drain_when_the_leader_dies_and_the_stale_leader_is_fenced() {
    let Some(etcd) = EtcdServer::start("failover") else {
        return;
    };
    let backend = Arc::new(EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap());
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 256),
    ];
    let vms: Vec<_> = (0..8).map(|i| vm(&format!("v{i}"), "t", "a", 1)).collect();
    let policies = Policies::default().with_overrides("out=2").unwrap();
    FleetStore::new(backend.clone())
        .seed(&hosts, &vms, &[], &policies)
        .unwrap();

    let mut first = Candidate::new("first", TTL_MS).unwrap();
    let mut second = Candidate::new("second", TTL_MS).unwrap();
    let Campaign::Won(lead1) = first.try_lead(&backend).unwrap() else {
        panic!("the first candidate leads an empty election")
    };
    assert_eq!(
        second.try_lead(&backend).unwrap(),
        Campaign::Held { by: "first".into() }
    );
    let mut s = Scheduler::open_as_leader(
        backend.clone(),
        SimMigrator::new(&hosts, &vms),
        None,
        &lead1,
    )
    .unwrap();
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    let mid = run_until(&mut s, Timestamp(0), 2_500);
    assert!(!mid.finished);
    let before = s.plan(&id).unwrap().clone();
    assert!(
        before
            .entries
            .iter()
            .any(|e| matches!(e.state, EntryState::Migrating { .. }))
            && before
                .entries
                .iter()
                .any(|e| matches!(e.state, EntryState::Migrated { .. })),
        "the leader dies mid-drain: {:?}",
        before.counts()
    );
    // The leader dies without stepping down; the hosts live on.
    let migrator = s.into_migrator();
    let died = Instant::now();
    let lead2 = loop {
        // The lease lapses, at most one TTL (and etcd's check) later.
        assert!(
            died.elapsed() < Duration::from_millis(TTL_MS * 3),
            "no takeover in {:?}",
            died.elapsed()
        );
        match second.try_lead(&backend).unwrap() {
            Campaign::Won(l) => break l,
            Campaign::Held { by } => assert_eq!(by, "first"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = died.elapsed();
    println!("takeover after {took:?} (lease TTL {TTL_MS} ms)");
    assert!(lead2.revision > lead1.revision);

    let mut s = Scheduler::open_as_leader(backend.clone(), migrator, None, &lead2).unwrap();
    assert_eq!(
        s.plan(&id).unwrap(),
        &before,
        "the new leader reads the plan"
    );
    assert!(run_all(&mut s, mid.end).finished);
    let plan = s.plan(&id).unwrap();
    assert_eq!(plan.state, PlanState::Done);
    let rec = s.migrator().record();
    for e in &plan.entries {
        let n = rec.iter().filter(|r| r.vm == e.vm).count();
        assert!(matches!(e.state, EntryState::Migrated { .. }), "{e:?}");
        assert_eq!(n, 1, "{} migrated {n} times", e.vm);
    }
    assert!(rec.iter().all(|r| r.outcome == Outcome::Committed));

    // The deposed leader comes back from a pause and tries to write: the
    // store refuses it, and nothing changes.
    let at = backend.revision().unwrap();
    let mut stale = Scheduler::open_as_leader(
        backend.clone(),
        SimMigrator::new(&hosts, &vms),
        None,
        &lead1,
    )
    .unwrap();
    match stale.prepare_drain("b", mid.end) {
        Err(SchedulerError::Store(StoreError::Fenced(l))) => assert_eq!(l, lead1.lease),
        other => panic!("a stale leader's write went through: {other:?}"),
    }
    assert_eq!(backend.revision().unwrap(), at);
    // A write under a live lease but a superseded claim is refused too.
    let mut fenced_by_claim = lead2.clone();
    fenced_by_claim.revision = lead1.revision;
    let mut stale = Scheduler::open_as_leader(
        backend.clone(),
        SimMigrator::new(&hosts, &vms),
        None,
        &fenced_by_claim,
    )
    .unwrap();
    let e = stale.prepare_drain("b", mid.end).unwrap_err();
    assert!(e.to_string().contains("another writer"), "{e}");
    assert_eq!(backend.revision().unwrap(), at);
}

#[test]
fn a_host_whose_lease_lapses_is_unreachable_and_receives_nothing() {
    let Some(etcd) = EtcdServer::start("host_lease") else {
        return;
    };
    let backend = Arc::new(EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap());
    let all = [
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 256),
    ];
    let regs: Vec<_> = all
        .iter()
        .map(|h| hosts::register(&backend, h, TTL_MS).unwrap())
        .collect();
    let vms: Vec<_> = (0..4).map(|i| vm(&format!("v{i}"), "t", "a", 1)).collect();
    FleetStore::new(backend.clone())
        .seed(&[], &vms, &[], &Policies::default())
        .unwrap();
    let listed = hosts::list(&backend).unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|h| h.alive == Some(true)));
    // b stops its keep-alives (its agent died); a and c keep theirs.
    let start = Instant::now();
    while hosts::liveness(&backend).unwrap()["b"] {
        assert!(
            start.elapsed() < Duration::from_millis(TTL_MS * 3),
            "b's lease never lapsed"
        );
        hosts::keep_alive(&backend, &regs[0]).unwrap();
        hosts::keep_alive(&backend, &regs[2]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut cand = Candidate::new("leader", TTL_MS).unwrap();
    let Campaign::Won(lead) = cand.try_lead(&backend).unwrap() else {
        panic!("nobody else leads")
    };
    let mut s =
        Scheduler::open_as_leader(backend.clone(), SimMigrator::new(&all, &vms), None, &lead)
            .unwrap();
    let changed = hosts::apply_liveness(&mut s, Timestamp(10)).unwrap();
    assert_eq!(changed, ["b"]);
    let b = s.fleet().host_ix("b").unwrap();
    assert!(matches!(
        s.fleet().host(b).health,
        Health::Unreachable { .. }
    ));
    let id = s.prepare_drain("a", Timestamp(10)).unwrap().id.clone();
    s.execute(&id, Timestamp(10)).unwrap();
    assert!(run_all(&mut s, Timestamp(10)).finished);
    for r in s.migrator().record() {
        assert_eq!(r.target, "c", "{} went to an unreachable host", r.vm);
    }
    // b registers again: healthy again at the leader's next look.
    let again = hosts::register(&backend, &all[1], TTL_MS).unwrap();
    assert_eq!(hosts::apply_liveness(&mut s, Timestamp(20)).unwrap(), ["b"]);
    assert!(s.fleet().host(b).health.is_healthy());
    let stored = hosts::list(&backend).unwrap();
    let b_rec = stored.iter().find(|h| h.host.name == "b").unwrap();
    assert_eq!(b_rec.alive, Some(true));
    assert!(
        b_rec.host.health.is_healthy(),
        "the scheduler wrote it back"
    );
    hosts::deregister(&backend, &again).unwrap();
    assert!(!hosts::liveness(&backend).unwrap()["b"]);
    // A bad host name is refused, and nothing is written.
    let mut bad = host("x y", "r1", 1);
    bad.name = "x y".into();
    let at = backend.revision().unwrap();
    assert!(hosts::register(&backend, &bad, TTL_MS).is_err());
    assert_eq!(backend.revision().unwrap(), at);
}

#[test]
fn serve_runs_a_stored_drain_to_its_end_on_the_wall_clock_and_resigns_on_stop() {
    use ferry_fleet::serve::{serve, ServeConfig, ServeEvent};
    use std::sync::atomic::AtomicBool;

    let Some(etcd) = EtcdServer::start("serve_drain") else {
        return;
    };
    let backend = Arc::new(EtcdBackend::connect(&etcd.endpoint, DEFAULT_PREFIX).unwrap());
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 256),
    ];
    let vms: Vec<_> = (0..4).map(|i| vm(&format!("v{i}"), "t", "a", 1)).collect();
    let policies = Policies::default().with_overrides("out=2").unwrap();
    // An operator's scheduler prepares and starts the drain, then exits.
    let id = {
        let mut s = open_on(backend.clone(), &hosts, &vms, &policies);
        let now = Timestamp::now_wall();
        let id = s.prepare_drain("a", now).unwrap().id.clone();
        s.execute(&id, now).unwrap();
        s.step_down().unwrap();
        id
    };
    let cfg = ServeConfig {
        name: "serve1".into(),
        lease_ttl_ms: TTL_MS,
        tick_ms: 50,
        max_run: Some(Duration::from_secs(30)),
    };
    let stop = AtomicBool::new(false);
    let mut events = Vec::new();
    let watcher = backend.clone();
    std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            serve(
                backend.clone(),
                &cfg,
                &stop,
                |store| {
                    let hosts: Vec<_> = store.hosts()?.into_iter().map(|v| v.value).collect();
                    let vms: Vec<_> = store.vms()?.into_iter().map(|v| v.value).collect();
                    Ok(SimMigrator::new(&hosts, &vms))
                },
                |m, now| m.advance(now),
                |e| events.push(e),
            )
        });
        let start = Instant::now();
        loop {
            let plans = FleetStore::new(watcher.clone()).plans().unwrap();
            if plans[0].value.state == PlanState::Done {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(25),
                "the drain did not end"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap().unwrap();
    });
    assert!(
        matches!(events.first(), Some(ServeEvent::Leading { .. })),
        "{events:?}"
    );
    let plan = FleetStore::new(backend.clone())
        .plans()
        .unwrap()
        .into_iter()
        .find(|p| p.value.id == id)
        .unwrap()
        .value;
    assert!(plan
        .entries
        .iter()
        .all(|e| matches!(e.state, EntryState::Migrated { .. })));
    let stored = FleetStore::new(backend.clone()).vms().unwrap();
    assert!(stored.iter().all(|v| v.value.host != "a"));
    // It resigned: the next candidate leads at once, without the TTL.
    let mut next = Candidate::new("next", TTL_MS).unwrap();
    assert!(matches!(next.try_lead(&backend).unwrap(), Campaign::Won(_)));
}
