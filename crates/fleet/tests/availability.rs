//! The VMs' availability policy in a drain: TERMINATE VMs stop, and with
//! automatic_restart boot again on another host.

mod common;

use common::*;
use ferry_fleet::model::VmRunState;
use ferry_fleet::plan::{EntryState, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::time::Timestamp;

#[test]
fn terminate_vms_stop_and_those_with_automatic_restart_boot_elsewhere() {
    let hosts = vec![
        host("a", "r1", 64),
        host("b", "r2", 256),
        host("c", "r3", 128),
    ];
    let vms = vec![
        terminate(vm("restart-me", "t", "a", 2), true),
        terminate(vm("let-go", "t", "a", 2), false),
        vm("live", "t", "a", 2),
    ];
    let mut s = open(&hosts, &vms, &Policies::default());
    let plan = s.prepare_drain("a", Timestamp(0)).unwrap().clone();
    let restart = plan.entries.iter().find(|e| e.vm == "restart-me").unwrap();
    assert!(
        restart.target.is_some(),
        "the dry run says where it restarts"
    );
    s.execute(&plan.id, Timestamp(0)).unwrap();
    assert!(run_all(&mut s, Timestamp(0)).finished);

    let done = s.plan(&plan.id).unwrap();
    assert_eq!(done.state, PlanState::Done);
    let entry = |id: &str| done.entries.iter().find(|e| e.vm == id).unwrap();
    let EntryState::Terminated {
        restarted_on: Some(on),
        ..
    } = &entry("restart-me").state
    else {
        panic!("{:?}", entry("restart-me"));
    };
    assert_ne!(on, "a");
    assert!(entry("restart-me")
        .reason
        .as_deref()
        .unwrap()
        .contains("automatic_restart"));
    assert_eq!(
        entry("let-go").state,
        EntryState::Terminated {
            restarted_on: None,
            at: match entry("let-go").state {
                EntryState::Terminated { at, .. } => at,
                _ => unreachable!(),
            }
        }
    );
    assert_eq!(
        entry("let-go").reason.as_deref(),
        Some("terminate per policy (no automatic restart)")
    );
    assert!(matches!(entry("live").state, EntryState::Migrated { .. }));

    // The migrator was asked to stop two VMs and boot one, and migrated
    // only the MIGRATE VM.
    let ops = s.migrator().ops();
    assert_eq!(ops.iter().filter(|o| !o.boot).count(), 2);
    let boots: Vec<_> = ops.iter().filter(|o| o.boot).collect();
    assert_eq!(boots.len(), 1);
    assert_eq!(
        (boots[0].vm.as_str(), boots[0].host.as_str()),
        ("restart-me", on.as_str())
    );
    let rec = s.migrator().record();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].vm, "live");

    // The fleet and the store agree.
    let f = s.fleet();
    let restarted = f.vm(f.vm_ix("restart-me").unwrap());
    assert_eq!(
        (&restarted.host, restarted.state),
        (on, VmRunState::Running)
    );
    let gone = f.vm(f.vm_ix("let-go").unwrap());
    assert_eq!(gone.state, VmRunState::Stopped);
    let stored = s.store().vms().unwrap();
    let g = stored.iter().find(|v| v.value.id == "let-go").unwrap();
    assert_eq!(g.value.state, VmRunState::Stopped);
    let a = f.host_ix("a").unwrap();
    assert_eq!(f.vms_on(a).count(), 0);
    assert_eq!(
        f.host(a).maintenance,
        ferry_fleet::model::Maintenance::InMaintenance
    );
}
