//! The simulated clock: advance the migrator, tick the scheduler, until
//! every plan is done or nothing can move any more.

use super::SimMigrator;
use crate::scheduler::{Scheduler, SchedulerError, TickReport};
use crate::store::Backend;
use crate::time::Timestamp;

#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    /// Simulated milliseconds between ticks.
    pub tick_ms: u64,
    /// Stop after this much simulated time.
    pub max_ms: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            tick_ms: 50,
            max_ms: 24 * 3_600_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    pub end: Timestamp,
    /// Every plan ended.
    pub finished: bool,
    pub ticks: u64,
}

/// Runs from `start` until no plan runs, nothing has moved for longer
/// than the longest pacing window (what waits cannot be placed), or
/// `limits.max_ms` passed. `on_tick` sees every tick.
pub fn run<B: Backend>(
    sched: &mut Scheduler<B, SimMigrator>,
    start: Timestamp,
    limits: RunLimits,
    mut on_tick: impl FnMut(Timestamp, &TickReport),
) -> Result<RunOutcome, SchedulerError> {
    let p = sched.policies().pacing;
    let patience = p.per_rack.interval_ms.max(p.fleet.interval_ms) + 1_000;
    let mut now = start;
    let mut idle_since = start;
    let mut ticks = 0;
    loop {
        now = now.plus_ms(limits.tick_ms.max(1));
        ticks += 1;
        sched.migrator_mut().advance(now);
        let r = sched.tick(now)?;
        on_tick(now, &r);
        if r.running_plans == 0 {
            return Ok(RunOutcome {
                end: now,
                finished: true,
                ticks,
            });
        }
        if r.in_flight > 0 || r.started > 0 || r.terminated > 0 || r.committed > 0 {
            idle_since = now;
        }
        if now.since(idle_since) > patience || now.since(start) >= limits.max_ms {
            return Ok(RunOutcome {
                end: now,
                finished: false,
                ticks,
            });
        }
    }
}
