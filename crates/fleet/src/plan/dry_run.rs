//! The dry run: the plan carried out by the real scheduler and planner on
//! a copy of the fleet, with the simulated migrator (whose durations are
//! plan::predict's model) on a simulated clock. It gives each entry its
//! target and predicted end, and the plan its predicted drain time, under
//! the very caps and pacing the real run will meet. Migrations of other
//! plans in flight are not in the copy: their slots count as free.

use crate::model::Fleet;
use crate::policy::Policies;
use crate::scheduler::SchedulerError;
use crate::sim::{open_simulated, run, RunLimits};
use crate::store::memory::MemoryBackend;
use crate::time::Timestamp;

use super::{EntryState, Plan, PlanState};

#[derive(Debug, Clone)]
pub struct DryRun {
    /// From the plan's start to its last entry's end.
    pub duration_ms: u64,
    /// False when some entries could not be carried out (see the plan).
    pub finished: bool,
    /// The plan as the dry run left it.
    pub plan: Plan,
}

pub fn dry_run(fleet: &Fleet, policies: &Policies, plan: &Plan) -> Result<DryRun, SchedulerError> {
    let hosts = fleet.hosts().to_vec();
    let vms = fleet.vms().to_vec();
    let tenants: Vec<_> = fleet.tenants().cloned().collect();
    let mut sched = open_simulated(MemoryBackend::new(), &hosts, &vms, &tenants, policies)?;
    let mut copy = plan.clone();
    copy.state = PlanState::Draft;
    let id = copy.id.clone();
    let start = Timestamp(0);
    sched.insert_plan(copy)?;
    sched.execute(&id, start)?;
    let outcome = run(&mut sched, start, RunLimits::default(), |_, _| {})?;
    let done = sched.plan(&id).expect("inserted").clone();
    let duration_ms = done
        .entries
        .iter()
        .filter_map(|e| match &e.state {
            EntryState::Migrated { finished_at, .. } => Some(finished_at.ms()),
            EntryState::Terminated { at, .. } => Some(at.ms()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    Ok(DryRun {
        duration_ms,
        finished: outcome.finished,
        plan: done,
    })
}

/// Writes the dry run's predictions into the plan: each entry's target
/// and predicted end, and the plan's predicted duration. A dry run that
/// fails leaves the plan without predictions.
pub fn apply(fleet: &Fleet, policies: &Policies, plan: &mut Plan) {
    let Ok(d) = dry_run(fleet, policies, plan) else {
        return;
    };
    plan.predicted_duration_ms = Some(d.duration_ms);
    for (e, p) in plan.entries.iter_mut().zip(&d.plan.entries) {
        match &p.state {
            EntryState::Migrated {
                target,
                finished_at,
                ..
            } => {
                e.target = Some(target.clone());
                e.predicted_end_ms = Some(finished_at.ms());
            }
            EntryState::Terminated { restarted_on, at } => {
                e.target = restarted_on.clone();
                e.predicted_end_ms = Some(at.ms());
            }
            _ => e.reason = p.reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fleet, ReceiveSetup, MIB};
    use crate::plan::prepare_drain;
    use crate::sim::fixtures::{host, vm};

    /// A fleet of one source `a` and targets that measured their setup:
    /// `b` 1 s + 2 s/GiB, `c` 0.5 s + 1 s/GiB. Three 1 GiB VMs on `a`
    /// with 64 MiB populated each.
    fn measured_fleet() -> Fleet {
        let mut b = host("b", "r2", 16);
        b.receive_setup = Some(ReceiveSetup {
            fixed_ms: 1000.0,
            per_gib_ms: 2000.0,
            samples: 2,
        });
        let mut c = host("c", "r3", 16);
        c.receive_setup = Some(ReceiveSetup {
            fixed_ms: 500.0,
            per_gib_ms: 1000.0,
            samples: 2,
        });
        let vms = ["v1", "v2", "v3"].map(|id| {
            let mut v = vm(id, "t", "a", 1);
            v.populated_bytes = 64 * MIB;
            v
        });
        Fleet::new(vec![host("a", "r1", 16), b, c], vms.to_vec(), vec![]).unwrap()
    }

    #[test]
    fn entries_are_charged_their_targets_setup() {
        let fleet = measured_fleet();
        let policies = Policies::default();
        let plan = prepare_drain(&fleet, &policies, &[], "a", None, Timestamp(0)).unwrap();
        // 64 MiB over 10 Gbit/s is 54 ms; the rest is the target's setup.
        let pages = (64 * MIB) as f64 / 1.25e9 * 1e3;
        for e in &plan.entries {
            let setup = match e.target.as_deref() {
                Some("b") => 3000.0,
                Some("c") => 1500.0,
                t => panic!("{} has no target: {t:?}", e.vm),
            };
            let want = setup + pages + crate::plan::predict::BLACKOUT_MS;
            assert!(
                (e.predicted_ms as f64 - want).abs() <= 1.0,
                "{}: {} ms, want {want}",
                e.vm,
                e.predicted_ms
            );
        }
    }

    #[test]
    fn the_drain_time_counts_the_setups_in_waves_under_the_caps() {
        let fleet = measured_fleet();
        // Two migrations out of a at a time (the default cap), one into
        // each target: the third waits for the first to end.
        let policies = Policies::default();
        assert_eq!(policies.caps.host_outbound, 2);
        let mut plan = prepare_drain(&fleet, &policies, &[], "a", None, Timestamp(0)).unwrap();
        apply(&fleet, &policies, &mut plan);
        let total = plan.predicted_duration_ms.expect("the dry run ran");
        let mut ends: Vec<u64> = plan
            .entries
            .iter()
            .map(|e| e.predicted_end_ms.expect("every entry ends"))
            .collect();
        ends.sort_unstable();
        assert_eq!(*ends.last().unwrap(), total);
        // One VM alone takes 1.5 s (c) or 3 s (b) plus ~56 ms of pages;
        // the third starts when the first ends (on c, at ~1.6 s) and
        // takes another ~1.6 s: the drain is two of c's setups after
        // another, beyond b's single one. (Ends are seen on 50 ms ticks.)
        assert!((1556..=1650).contains(&ends[0]), "{ends:?}");
        assert!((3112..=3300).contains(&total), "{ends:?}");
        // Without the caps it would be one wave: the longest single move.
        let loose = Policies::default().with_overrides("out=8,in=8").unwrap();
        let mut p2 = prepare_drain(&fleet, &loose, &[], "a", None, Timestamp(0)).unwrap();
        apply(&fleet, &loose, &mut p2);
        assert!(
            p2.predicted_duration_ms.unwrap() < total,
            "{:?} vs {total}",
            p2.predicted_duration_ms
        );
    }
}
