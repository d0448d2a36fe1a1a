//! The planner's rules, one small fleet each.

use super::*;
use crate::model::{Fleet, Maintenance, Version, Vm, GIB};
use crate::policy::{Policies, Priority};
use crate::sim::fixtures::host;
use crate::time::Timestamp;

/// The shared fixtures, with half of each VM's memory populated (the
/// planner's rules here do not depend on it; the dry run's figures do).
fn vm(id: &str, tenant: &str, host: &str, mem_gib: u64) -> Vm {
    Vm {
        populated_bytes: mem_gib * GIB / 2,
        ..crate::sim::fixtures::vm(id, tenant, host, mem_gib)
    }
}

fn work(fleet: &Fleet, ids: &[&str], priority: Priority) -> Vec<WorkItem> {
    ids.iter()
        .enumerate()
        .map(|(key, id)| WorkItem {
            key,
            vm: fleet.vm_ix(id).unwrap(),
            priority,
            action: WorkAction::Migrate { to: None },
            avoid: vec![],
        })
        .collect()
}

fn run(
    fleet: &Fleet,
    policies: &Policies,
    work: &[WorkItem],
    in_flight: &[InFlight],
) -> Vec<Decision> {
    decide(&PlannerInput {
        fleet,
        policies,
        work,
        in_flight,
        recent_starts: &[],
        now: Timestamp(1_000),
    })
}

fn started(fleet: &Fleet, d: &[Decision]) -> Vec<String> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Migrate { vm, .. } => Some(fleet.vm(*vm).id.clone()),
            _ => None,
        })
        .collect()
}

fn reason_of(fleet: &Fleet, d: &[Decision], id: &str) -> String {
    d.iter()
        .find_map(|d| match d {
            Decision::Wait { vm, reason, .. } if fleet.vm(*vm).id == id => Some(reason.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{id} does not wait: {d:?}"))
}

#[test]
fn higher_priority_takes_the_slot_first() {
    let fleet = Fleet::new(
        vec![
            host("a", "r1", 64),
            host("b", "r1", 64),
            host("c", "r2", 64),
        ],
        vec![vm("v1", "t", "a", 1), vm("v2", "t", "b", 1)],
        vec![],
    )
    .unwrap();
    let mut p = Policies::default();
    p.caps.fleet = 1;
    p.caps.host_outbound = 1;
    let mut w = work(&fleet, &["v1"], Priority::Rebalancing);
    w.extend(
        work(&fleet, &["v2"], Priority::Evacuation)
            .into_iter()
            .map(|mut x| {
                x.key = 1;
                x
            }),
    );
    let d = run(&fleet, &p, &w, &[]);
    assert_eq!(started(&fleet, &d), ["v2"]);
    assert!(reason_of(&fleet, &d, "v1").contains("fleet-wide slot: 1 of 1"));
}

#[test]
fn an_outbound_slot_is_named_with_its_holder() {
    let fleet = Fleet::new(
        vec![host("a", "r1", 64), host("b", "r2", 64)],
        vec![vm("v7", "t", "a", 1), vm("v8", "t", "a", 1)],
        vec![],
    )
    .unwrap();
    let mut p = Policies::default();
    p.caps.host_outbound = 1;
    let w = work(&fleet, &["v8"], Priority::Maintenance);
    let busy = [InFlight {
        vm: fleet.vm_ix("v7").unwrap(),
        source: fleet.host_ix("a").unwrap(),
        target: fleet.host_ix("b").unwrap(),
    }];
    let d = run(&fleet, &p, &w, &busy);
    assert_eq!(
        reason_of(&fleet, &d, "v8"),
        "waiting for an outbound slot on a held by v7"
    );
}

#[test]
fn an_inbound_cap_sends_the_next_vm_elsewhere() {
    let fleet = Fleet::new(
        vec![
            host("a", "r1", 64),
            host("b", "r2", 64),
            host("c", "r2", 32),
        ],
        vec![vm("v1", "t", "a", 1), vm("v2", "t", "a", 1)],
        vec![],
    )
    .unwrap();
    let mut p = Policies::default();
    p.caps.host_inbound = 1;
    let d = run(
        &fleet,
        &p,
        &work(&fleet, &["v1", "v2"], Priority::Maintenance),
        &[],
    );
    let targets: Vec<&str> = d
        .iter()
        .filter_map(|d| match d {
            Decision::Migrate { target, .. } => Some(fleet.host(*target).name.as_str()),
            _ => None,
        })
        .collect();
    // b has the most room, then c.
    assert_eq!(targets, ["b", "c"]);
}

#[test]
fn headroom_is_never_filled() {
    // b has 10 GiB; 10% headroom leaves 9; 8 are used.
    let fleet = Fleet::new(
        vec![host("a", "r1", 64), host("b", "r1", 10)],
        vec![vm("big", "t", "b", 8), vm("v", "t", "a", 2)],
        vec![],
    )
    .unwrap();
    let d = run(
        &fleet,
        &Policies::default(),
        &work(&fleet, &["v"], Priority::Maintenance),
        &[],
    );
    let why = reason_of(&fleet, &d, "v");
    assert!(
        why.starts_with("no target with 2 GiB and 1 vCPUs free"),
        "{why}"
    );
    assert!(why.contains("1 GiB"), "{why}");
}

#[test]
fn compatibility_and_anti_affinity_rule_targets_out() {
    let mut old = host("old", "r2", 256);
    old.version = Version::new(1, 2);
    let mut plain = host("plain", "r2", 128);
    plain.cpu_features.clear();
    let mut sick = host("sick", "r2", 512);
    sick.health = Health::Degraded {
        reason: "ECC errors".into(),
    };
    let mut due = host("due", "r2", 512);
    due.maintenance = Maintenance::Scheduled { at: Timestamp(9) };
    let mut v = vm("v", "t", "a", 1);
    v.anti_affinity = ["db".to_string()].into();
    let mut peer = vm("peer", "t", "grouped", 1);
    peer.anti_affinity = ["db".to_string()].into();
    let fleet = Fleet::new(
        vec![
            host("a", "r1", 64),
            old,
            plain,
            sick,
            due,
            host("grouped", "r2", 96),
            host("fine", "r3", 16),
        ],
        vec![v, peer],
        vec![],
    )
    .unwrap();
    let d = run(
        &fleet,
        &Policies::default(),
        &work(&fleet, &["v"], Priority::Maintenance),
        &[],
    );
    let target = d.iter().find_map(|d| match d {
        Decision::Migrate { target, .. } => Some(fleet.host(*target).name.clone()),
        _ => None,
    });
    assert_eq!(target.as_deref(), Some("fine"), "{d:?}");

    // Without "fine", the reason counts each refusal.
    let mut hosts = fleet.hosts().to_vec();
    hosts.retain(|h| h.name != "fine");
    let fleet = Fleet::new(hosts, fleet.vms().to_vec(), vec![]).unwrap();
    let d = run(
        &fleet,
        &Policies::default(),
        &work(&fleet, &["v"], Priority::Maintenance),
        &[],
    );
    let why = reason_of(&fleet, &d, "v");
    for part in [
        "1 lack its CPU features",
        "1 run a version it cannot move to",
        "1 hold a VM of its anti-affinity group",
    ] {
        assert!(why.contains(part), "{why}");
    }
}

#[test]
fn a_named_target_is_checked_and_refused_in_words() {
    let mut plain = host("plain", "r2", 128);
    plain.cpu_features.clear();
    let fleet = Fleet::new(
        vec![host("a", "r1", 64), plain],
        vec![vm("v", "t", "a", 1)],
        vec![],
    )
    .unwrap();
    let mut w = work(&fleet, &["v"], Priority::OperatorRequest);
    w[0].action = WorkAction::Migrate {
        to: fleet.host_ix("plain"),
    };
    let d = run(&fleet, &Policies::default(), &w, &[]);
    assert_eq!(
        reason_of(&fleet, &d, "v"),
        "target plain refused: plain lacks CPU features avx2"
    );
}

#[test]
fn pacing_counts_recent_starts_per_rack() {
    let fleet = Fleet::new(
        vec![host("a", "r3", 64), host("b", "r4", 64)],
        vec![vm("v", "t", "a", 1), vm("w", "t", "b", 1)],
        vec![],
    )
    .unwrap();
    let mut p = Policies::default();
    p.pacing.per_rack.max_starts = 2;
    let a = fleet.host_ix("a").unwrap();
    let recent = [
        RecentStart {
            at: Timestamp(500),
            source: a,
        },
        RecentStart {
            at: Timestamp(900),
            source: a,
        },
    ];
    let w = work(&fleet, &["v", "w"], Priority::Maintenance);
    let input = PlannerInput {
        fleet: &fleet,
        policies: &p,
        work: &w,
        in_flight: &[],
        recent_starts: &recent,
        now: Timestamp(1_000),
    };
    let d = decide(&input);
    assert_eq!(
        reason_of(&fleet, &d, "v"),
        "paced: rack r3 started 2 migrations in the last 10 s"
    );
    assert_eq!(started(&fleet, &d), ["w"]);
    // Ten seconds after the first start, one slot of the window is free.
    let later = PlannerInput {
        now: Timestamp(10_500),
        ..input
    };
    assert_eq!(started(&fleet, &decide(&later)), ["v", "w"]);
}

#[test]
fn tenants_take_turns_and_the_same_input_gives_the_same_answer() {
    let mut vms: Vec<Vm> = (0..4)
        .map(|i| vm(&format!("a{i}"), "ta", "src", 1))
        .collect();
    vms.extend((0..2).map(|i| vm(&format!("b{i}"), "tb", "src", 1)));
    let fleet = Fleet::new(
        vec![
            host("src", "r1", 64),
            host("dst", "r2", 64),
            host("dst2", "r2", 64),
        ],
        vms,
        vec![],
    )
    .unwrap();
    let mut p = Policies::default();
    p.caps.host_outbound = 3;
    p.caps.host_inbound = 3;
    let w = work(
        &fleet,
        &["a0", "a1", "a2", "a3", "b0", "b1"],
        Priority::Maintenance,
    );
    let d = run(&fleet, &p, &w, &[]);
    assert_eq!(started(&fleet, &d), ["a0", "b0", "a1"]);
    assert_eq!(d, run(&fleet, &p, &w, &[]));
}

#[test]
fn terminate_with_restart_gets_a_host_and_without_says_so() {
    let fleet = Fleet::new(
        vec![host("a", "r1", 64), host("b", "r2", 64)],
        vec![vm("keep", "t", "a", 1), vm("drop", "t", "a", 1)],
        vec![],
    )
    .unwrap();
    let mut w = work(&fleet, &["keep", "drop"], Priority::Maintenance);
    w[0].action = WorkAction::Terminate { restart: true };
    w[1].action = WorkAction::Terminate { restart: false };
    let d = run(&fleet, &Policies::default(), &w, &[]);
    assert!(d.iter().any(|d| matches!(d,
        Decision::Terminate { restart_on: Some(h), .. } if fleet.host(*h).name == "b")));
    assert!(d.iter().any(|d| matches!(
        d,
        Decision::Terminate {
            restart_on: None,
            note: Some(WaitReason::TerminatePerPolicy),
            ..
        }
    )));
}
