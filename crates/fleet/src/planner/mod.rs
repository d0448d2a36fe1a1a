//! The planner: a pure, deterministic function from the fleet's state,
//! the policies, the work waiting and the migrations running, and `now`,
//! to decisions: which migrations start now and to which target, which
//! VMs are terminated (and where they boot again), and for every VM that
//! waits, why. It reads no clock and keeps nothing between calls; the
//! scheduler feeds it and carries out what it decides.
//!
//! A round costs O(work · log hosts) plus one pass over the hosts to set
//! up the target index: the fleet's indexes (model::Fleet) are kept up to
//! date outside it, so 20,000 VMs cost nothing until they are work.

pub mod order;
pub mod pacing;
pub mod reason;
pub mod slots;
pub mod targets;
pub mod work;

pub use reason::WaitReason;
pub use work::{Decision, InFlight, RecentStart, WorkAction, WorkItem};

use crate::model::{Fleet, Health};
use crate::policy::Policies;
use crate::time::Timestamp;

use pacing::PaceWindow;
use slots::Slots;
use targets::Targets;

/// Everything one planning round reads.
pub struct PlannerInput<'a> {
    pub fleet: &'a Fleet,
    pub policies: &'a Policies,
    pub work: &'a [WorkItem],
    pub in_flight: &'a [InFlight],
    /// Starts inside the longest pacing window (older ones may be left in;
    /// they are not counted).
    pub recent_starts: &'a [RecentStart],
    pub now: Timestamp,
}

/// One decision per work item, in service order.
pub fn decide(input: &PlannerInput<'_>) -> Vec<Decision> {
    let fleet = input.fleet;
    let mut slots = Slots::new(fleet, input.policies, input.in_flight);
    let mut pace = PaceWindow::new(fleet, input.policies.pacing, input.recent_starts, input.now);
    let mut targets = Targets::new(fleet, input.policies, input.in_flight);
    let order = order::service_order(fleet, input.work, &slots);
    let mut out = Vec::with_capacity(order.len());
    for i in order {
        let w = &input.work[i];
        let (key, vm) = (w.key, w.vm);
        let source = fleet.vm_host(vm);
        let wait = |reason| Decision::Wait { key, vm, reason };
        match &w.action {
            WorkAction::Terminate { restart } => {
                let (restart_on, note) = if !restart {
                    (None, Some(WaitReason::TerminatePerPolicy))
                } else {
                    match targets.choose(vm, source, &w.avoid, None) {
                        Ok(h) => {
                            targets.reserve(vm, h);
                            (Some(h), None)
                        }
                        Err(why) => (None, Some(why)),
                    }
                };
                out.push(Decision::Terminate {
                    key,
                    vm,
                    restart_on,
                    note,
                });
            }
            WorkAction::Migrate { to } => {
                if slots.is_migrating(vm) {
                    out.push(wait(WaitReason::AlreadyMigrating));
                    continue;
                }
                if let Health::Unreachable { .. } = fleet.host(source).health {
                    out.push(wait(WaitReason::SourceUnreachable {
                        host: fleet.host(source).name.clone(),
                    }));
                    continue;
                }
                if let Some(why) = slots.source_side(vm, source) {
                    out.push(wait(why));
                    continue;
                }
                if let Some(why) = pace.check(source) {
                    out.push(wait(why));
                    continue;
                }
                let target = match to {
                    Some(h) => match targets.refuse(vm, source, *h) {
                        Some(why) => Err(WaitReason::TargetRefused {
                            host: fleet.host(*h).name.clone(),
                            why,
                        }),
                        None if !slots.inbound_free(*h) => Err(slots.inbound_full(*h)),
                        None => Ok(*h),
                    },
                    None => targets.choose(vm, source, &w.avoid, Some(&slots)),
                };
                match target {
                    Ok(target) => {
                        slots.take(vm, source, target);
                        pace.count(source);
                        targets.reserve(vm, target);
                        out.push(Decision::Migrate {
                            key,
                            vm,
                            source,
                            target,
                        });
                    }
                    Err(why) => out.push(wait(why)),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
