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
