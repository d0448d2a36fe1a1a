//! A plan is stored split, header and one key per entry, and a step of a
//! drain writes only the entries it changed; a plan stored whole (an
//! earlier version's) still loads and is split when next written.

mod common;

use common::*;
use ferry_fleet::plan::EntryState;
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::Scheduler;
use ferry_fleet::sim::SimMigrator;
use ferry_fleet::store::fleet_store::{entry_key, plan_key, PLAN_ENTRIES};
use ferry_fleet::store::memory::MemoryBackend;
use ferry_fleet::store::{Backend, Expect, FleetStore, Op, Txn};
use ferry_fleet::time::Timestamp;

fn fleet() -> (Vec<ferry_fleet::model::Host>, Vec<ferry_fleet::model::Vm>) {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 256),
    ];
    let vms = (0..8).map(|i| vm(&format!("v{i}"), "t", "a", 1)).collect();
    (hosts, vms)
}

#[test]
fn a_step_of_a_drain_writes_only_the_entries_it_changed() {
    let (hosts, vms) = fleet();
    let policies = Policies::default().with_overrides("out=1").unwrap();
    let mut s = open(&hosts, &vms, &policies);
    let id = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    let b = s.store().backend();
    let header = b.get(&plan_key(&id)).unwrap().unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header.value).unwrap();
    assert_eq!(header["entries"], serde_json::json!([]));
    assert_eq!(b.list(PLAN_ENTRIES).unwrap().len(), 8);

    s.execute(&id, Timestamp(0)).unwrap();
    // One outbound slot: the first tick starts one migration, and gives
    // every other entry its reason to wait.
    s.migrator_mut().advance(Timestamp(50));
    s.tick(Timestamp(50)).unwrap();
    let before = s.store().backend().revision().unwrap();
    // While the migration runs nothing changes for the entries, and
    // nothing of the plan is written again (a whole-plan value would be
    // rewritten at every step that touched any entry).
    let mut now = Timestamp(50);
    while now.ms() < 500 {
        now = now.plus_ms(50);
        s.migrator_mut().advance(now);
        s.tick(now).unwrap();
    }
    let plan_writes: Vec<String> = s
        .store()
        .backend()
        .changes_since(before)
        .unwrap()
        .into_iter()
        .map(|c| c.key)
        .filter(|k| k.starts_with(PLAN_ENTRIES) || k.starts_with("plans/"))
        .collect();
    assert!(plan_writes.is_empty(), "{plan_writes:?}");
    // The migration ends and the next starts: the entries that changed
    // are written, each under its own key.
    let before = s.store().backend().revision().unwrap();
    while s.migrator().record().len() < 2 {
        now = now.plus_ms(50);
        assert!(now.ms() < 60_000, "no second migration");
        s.migrator_mut().advance(now);
        s.tick(now).unwrap();
    }
    let changes = s.store().backend().changes_since(before).unwrap();
    let migrating: Vec<usize> = s
        .plan(&id)
        .unwrap()
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.state, EntryState::Migrating { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(migrating.len(), 1);
    let key = entry_key(&id, migrating[0]);
    assert!(changes.iter().any(|c| c.key == key), "{changes:?}");

    // Reopened from the store, the plan is the same.
    let plan = s.plan(&id).unwrap().clone();
    let backend = MemoryBackend::new();
    for e in s.store().backend().list("").unwrap() {
        backend
            .commit(&Txn {
                checks: vec![],
                ops: vec![Op::Put {
                    key: e.key,
                    value: e.value,
                }],
                lease: None,
            })
            .unwrap();
    }
    let again = Scheduler::open(backend, SimMigrator::new(&hosts, &vms), None).unwrap();
    assert_eq!(again.plan(&id).unwrap(), &plan);
}

#[test]
fn a_plan_stored_whole_loads_and_is_split_when_next_written() {
    let (hosts, vms) = fleet();
    let policies = Policies::default();
    let s = open(&hosts, &vms, &policies);
    let mut plan = {
        let mut s = s;
        s.prepare_drain("a", Timestamp(0)).unwrap().clone()
    };
    // As an earlier version stored it: one value with every entry.
    plan.id = "legacy".into();
    let store = FleetStore::new(MemoryBackend::new());
    store.seed(&hosts, &vms, &[], &policies).unwrap();
    store
        .backend()
        .commit(&Txn {
            checks: vec![(plan_key("legacy"), Expect::Absent)],
            ops: vec![Op::Put {
                key: plan_key("legacy"),
                value: serde_json::to_vec(&plan).unwrap(),
            }],
            lease: None,
        })
        .unwrap();
    let mut s =
        Scheduler::open(store.into_backend(), SimMigrator::new(&hosts, &vms), None).unwrap();
    assert_eq!(s.plan("legacy").unwrap(), &plan);
    s.execute("legacy", Timestamp(0)).unwrap();
    let b = s.store().backend();
    assert_eq!(b.list(&format!("{PLAN_ENTRIES}legacy/")).unwrap().len(), 8);
    let header: serde_json::Value =
        serde_json::from_slice(&b.get(&plan_key("legacy")).unwrap().unwrap().value).unwrap();
    assert_eq!(header["entries"], serde_json::json!([]));
    assert!(run_all(&mut s, Timestamp(0)).finished);
    let stored = s.store().plans().unwrap();
    let legacy = stored.iter().find(|p| p.value.id == "legacy").unwrap();
    assert_eq!(&legacy.value, s.plan("legacy").unwrap());
}

/// Each dry run of a drain stores a draft; the next one of the same hosts
/// replaces it, so drafts do not pile up, and a running plan is never
/// touched.
#[test]
fn a_new_draft_of_a_drain_replaces_the_last_one_of_the_same_hosts() {
    let (hosts, vms) = fleet();
    let mut s = open(&hosts, &vms, &Policies::default());
    let first = s.prepare_drain("a", Timestamp(0)).unwrap().id.clone();
    let second = s.prepare_drain("a", Timestamp(1)).unwrap().id.clone();
    assert_ne!(first, second);
    let ids: Vec<String> = s.plans().iter().map(|p| p.id.clone()).collect();
    assert_eq!(ids, vec![second.clone()]);
    let b = s.store().backend();
    assert!(b.get(&plan_key(&first)).unwrap().is_none());
    assert!(b.get(&entry_key(&first, 0)).unwrap().is_none());
    assert_eq!(
        b.list(PLAN_ENTRIES).unwrap().len(),
        8,
        "only the new draft's"
    );
    // A draft that runs stays when the host's next dry run comes.
    s.execute(&second, Timestamp(2)).unwrap();
    let third = s.prepare_drain("a", Timestamp(3)).map(|p| p.state);
    let kept: Vec<String> = s.plans().iter().map(|p| p.id.clone()).collect();
    assert!(kept.contains(&second), "{kept:?} ({third:?})");
    assert!(b_has(&s, &second));
}

fn b_has<M: ferry_fleet::migrator::Migrator>(s: &Scheduler<MemoryBackend, M>, id: &str) -> bool {
    s.store().backend().get(&plan_key(id)).unwrap().is_some()
}
