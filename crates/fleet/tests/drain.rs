//! Drains under policy: caps never exceeded (from the migrator's own
//! record), priorities, fairness, and drains that cannot start.

mod common;

use common::*;
use ferry_fleet::plan::{EntryState, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::SchedulerError;
use ferry_fleet::sim::migrator::Outcome;
use ferry_fleet::sim::{audit, generate, FleetSpec};
use ferry_fleet::time::Timestamp;

#[test]
fn caps_and_pacing_hold_over_a_whole_rack_drain() {
    let spec = FleetSpec {
        hosts: 200,
        vms: 4000,
        tenants: 12,
        ..FleetSpec::default()
    };
    let (hosts, vms, _) = generate(&spec);
    let policies = Policies::default()
        .with_overrides("out=1,in=1,tenant=3,fleet=12,rack-pace=6/5s,fleet-pace=20/10s")
        .unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let t0 = Timestamp(0);
    let plan = s.prepare_drain("rack3", t0).unwrap().clone();
    assert_eq!(plan.state, PlanState::Draft);
    assert_eq!(plan.kind.hosts().len(), 20);
    let predicted = plan.predicted_duration_ms.expect("the dry run predicts");
    s.execute(&plan.id, t0).unwrap();
    let out = run_all(&mut s, t0);
    assert!(out.finished, "{out:?}");

    let done = s.plan(&plan.id).unwrap();
    assert_eq!(done.state, PlanState::Done);
    assert!(done.entries.iter().all(|e| e.state.is_final()));
    let rec = s.migrator().record();
    let a = audit(rec, &policies);
    assert!(a.violations.is_empty(), "{:?}", a.violations);
    // The caps were reached (they were what bound the drain), not merely
    // left alone.
    assert_eq!(a.host_outbound.peak, 1);
    assert!(a.fleet.peak <= 12 && a.fleet.peak >= 6, "{a:?}");
    assert!(a.rack_starts_per_window.peak <= 6, "{a:?}");
    // Every drained host is empty and in maintenance; no VM moved twice.
    for h in plan.kind.hosts() {
        let ix = s.fleet().host_ix(h).unwrap();
        assert_eq!(s.fleet().vms_on(ix).count(), 0, "{h}");
    }
    let committed: Vec<&str> = rec
        .iter()
        .filter(|r| r.outcome == Outcome::Committed)
        .map(|r| r.vm.as_str())
        .collect();
    let mut unique = committed.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), committed.len());
    // No target was a host of the rack, and none was filled above its
    // headroom.
    for r in rec {
        assert_ne!(r.target_rack, "rack3");
    }
    for (h, host) in s.fleet().hosts().iter().enumerate() {
        let usable = host.capacity.less_headroom(policies.headroom_percent);
        assert!(usable.holds(s.fleet().used(h)), "{} overfilled", host.name);
    }
    // The simulated run follows the same model the dry run used.
    let actual = done
        .entries
        .iter()
        .filter_map(|e| match &e.state {
            EntryState::Migrated { finished_at, .. } => Some(finished_at.ms()),
            EntryState::Terminated { at, .. } => Some(at.ms()),
            _ => None,
        })
        .max()
        .unwrap();
    assert_eq!(actual, predicted);
}

#[test]
fn an_evacuation_goes_before_a_drain() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r1", 64),
        host("c", "r2", 256),
        host("d", "r2", 256),
    ];
    let mut vms: Vec<_> = (0..4).map(|i| vm(&format!("a{i}"), "t", "a", 1)).collect();
    vms.extend((0..4).map(|i| vm(&format!("b{i}"), "t", "b", 1)));
    let policies = Policies::default().with_overrides("fleet=1").unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let t0 = Timestamp(0);
    let drain = s.prepare_drain("a", t0).unwrap().id.clone();
    s.execute(&drain, t0).unwrap();
    s.evacuate("b", "correctable ECC errors over threshold", t0)
        .unwrap();
    assert!(run_all(&mut s, t0).finished);
    let order: Vec<&str> = s
        .migrator()
        .record()
        .iter()
        .map(|r| r.vm.as_str())
        .collect();
    assert_eq!(order.len(), 8);
    assert!(
        order[..4].iter().all(|v| v.starts_with('b')),
        "evacuation first: {order:?}"
    );
    // The degraded host received nothing.
    assert!(s.migrator().record().iter().all(|r| r.target != "b"));
}

#[test]
fn two_tenants_interleave_under_a_per_tenant_cap() {
    let hosts = vec![
        host("src", "r1", 256),
        host("dst", "r2", 256),
        host("dst2", "r3", 256),
    ];
    // Tenant a's VMs come first on the host: without fairness it would
    // take every slot.
    let mut vms: Vec<_> = (0..6)
        .map(|i| vm(&format!("a{i}"), "ta", "src", 1))
        .collect();
    vms.extend((0..6).map(|i| vm(&format!("b{i}"), "tb", "src", 1)));
    let policies = Policies::default()
        .with_overrides("out=2,in=2,tenant=2")
        .unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let id = s.prepare_drain("src", Timestamp(0)).unwrap().id.clone();
    s.execute(&id, Timestamp(0)).unwrap();
    assert!(run_all(&mut s, Timestamp(0)).finished);
    let tenants: Vec<&str> = s
        .migrator()
        .record()
        .iter()
        .map(|r| r.tenant.as_str())
        .collect();
    assert_eq!(tenants.len(), 12);
    let (mut a, mut b) = (0i32, 0i32);
    for t in &tenants {
        if *t == "ta" {
            a += 1
        } else {
            b += 1
        }
        assert!(
            (a - b).abs() <= 1,
            "tenants did not take turns: {tenants:?}"
        );
    }
    assert!(audit(s.migrator().record(), &policies)
        .violations
        .is_empty());
}

#[test]
fn a_drain_of_the_last_host_with_capacity_says_which_vms_cannot_move_and_does_not_start() {
    let mut full = host("b", "r1", 8);
    full.capacity.mem_bytes = 8 << 30;
    let hosts = vec![host("a", "r1", 64), full];
    let vms = vec![
        vm("big", "t", "a", 4),
        vm("filler", "t", "b", 6),
        terminate(vm("gone", "t", "a", 1), false),
    ];
    let mut s = open(&hosts, &vms, &Policies::default());
    let plan = s.prepare_drain("a", Timestamp(0)).unwrap().clone();
    assert_eq!(plan.state, PlanState::Refused);
    let blocked: Vec<_> = plan.blocked().collect();
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].vm, "big");
    let why = blocked[0].reason.as_deref().unwrap();
    assert!(why.starts_with("no target with 4 GiB"), "{why}");
    // The TERMINATE VM is not blocked: its policy needs no target.
    let gone = plan.entries.iter().find(|e| e.vm == "gone").unwrap();
    assert_eq!(gone.state, EntryState::Pending);
    let e = s.execute(&plan.id, Timestamp(0)).unwrap_err();
    assert!(matches!(e, SchedulerError::PlanRefused { .. }), "{e}");
    assert!(e.to_string().contains("big: no target with 4 GiB"), "{e}");
    // Nothing started, nothing changed, and the refused plan is stored.
    run_until(&mut s, Timestamp(0), 2_000);
    assert!(s.migrator().record().is_empty());
    assert!(s.migrator().ops().is_empty());
    let a = s.fleet().host_ix("a").unwrap();
    assert_eq!(s.fleet().vms_on(a).count(), 2);
    let stored = s.store().plans().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].value.state, PlanState::Refused);
}

#[test]
fn a_drain_of_an_unknown_host_is_refused_and_stores_nothing() {
    let hosts = vec![host("a", "r1", 64), host("b", "r1", 64)];
    let mut s = open(&hosts, &[vm("v", "t", "a", 1)], &Policies::default());
    let e = s.prepare_drain("nope", Timestamp(0)).unwrap_err();
    assert!(e.to_string().contains("no host or rack nope"), "{e}");
    assert!(s.store().plans().unwrap().is_empty());
    assert!(matches!(
        s.execute("nope", Timestamp(0)).unwrap_err(),
        SchedulerError::NoPlan(_)
    ));
    // A rack drains by its label.
    let plan = s.prepare_drain("r1", Timestamp(0)).unwrap();
    assert_eq!(plan.kind.hosts(), ["a", "b"]);
    assert_eq!(plan.state, PlanState::Refused, "nowhere else to go");
}

#[test]
fn invalid_policies_are_refused_before_anything_runs() {
    let hosts = vec![host("a", "r1", 64)];
    let mut bad = Policies::default();
    bad.caps.per_tenant = 0;
    let e = ferry_fleet::sim::open_simulated(
        ferry_fleet::store::memory::MemoryBackend::new(),
        &hosts,
        &[],
        &[],
        &bad,
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("caps.per_tenant = 0"), "{e}");
    for spec in [
        "headroom=100",
        "fleet=0",
        "rack-pace=0/10s",
        "attempts=0",
        "in=x",
    ] {
        let e = Policies::default().with_overrides(spec).unwrap_err();
        assert!(!e.to_string().is_empty(), "{spec}");
    }
}
