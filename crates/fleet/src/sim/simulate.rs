//! One simulation: generate a fleet, seed a store with it, prepare the
//! drain (with its dry run), execute it with the simulated migrator on the
//! simulated clock, audit what ran, report.

use std::path::PathBuf;
use std::time::Instant;

use super::report::{Decisions, Migrations, SimReport};
use super::{audit, generate, open_simulated, run, FleetSpec, RunLimits};
use crate::plan::{EntryState, PlanState};
use crate::policy::Policies;
use crate::scheduler::SchedulerError;
use crate::sim::migrator::Outcome;
use crate::store::embedded::RedbBackend;
use crate::store::memory::MemoryBackend;
use crate::store::{Backend, StoreError};
use crate::time::Timestamp;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub spec: FleetSpec,
    /// A host, or a rack.
    pub drain: String,
    pub policies: Policies,
    pub limits: RunLimits,
    /// A redb file to keep the fleet in (it must not exist); default: in
    /// memory.
    pub store: Option<PathBuf>,
    /// Hosts that fail mid-drain: (host, simulated ms after the start).
    pub failures: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Copy)]
pub struct SimProgress {
    pub now_ms: u64,
    pub done: usize,
    pub total: usize,
    pub in_flight: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store file {0} exists already; the simulator writes a fresh one")]
    StoreExists(PathBuf),
    #[error("--fail names {0}, which is not a host of the simulated fleet")]
    UnknownFailure(String),
}

pub fn simulate(
    cfg: &SimConfig,
    progress: &mut dyn FnMut(SimProgress),
) -> Result<SimReport, SimError> {
    cfg.policies.validate().map_err(SchedulerError::from)?;
    match &cfg.store {
        None => simulate_on(cfg, MemoryBackend::new(), progress),
        Some(path) => {
            if path.exists() {
                return Err(SimError::StoreExists(path.clone()));
            }
            simulate_on(cfg, RedbBackend::open(path)?, progress)
        }
    }
}

fn simulate_on<B: Backend>(
    cfg: &SimConfig,
    backend: B,
    progress: &mut dyn FnMut(SimProgress),
) -> Result<SimReport, SimError> {
    let (hosts, vms, tenants) = generate(&cfg.spec);
    for (h, _) in &cfg.failures {
        if !hosts.iter().any(|x| &x.name == h) {
            return Err(SimError::UnknownFailure(h.clone()));
        }
    }
    let mut sched = open_simulated(backend, &hosts, &vms, &tenants, &cfg.policies)?;
    let start = Timestamp(0);
    let clock = Instant::now();
    let plan = sched.prepare_drain(&cfg.drain, start)?.clone();
    let dry_run_wall_ms = clock.elapsed().as_secs_f64() * 1e3;
    let mut report = SimReport::new(cfg, &hosts, vms.len(), &plan);
    report.dry_run_wall_ms = dry_run_wall_ms;
    if plan.state == PlanState::Refused {
        return Ok(report);
    }
    sched.execute(&plan.id, start)?;
    let total = plan.entries.len();
    let mut failures = cfg.failures.clone();
    failures.sort_by_key(|f| f.1);
    let clock = Instant::now();
    let mut last_shown = 0u64;
    let mut pending_failures = failures.into_iter().peekable();
    // The runner ticks; failures are injected between ticks by running
    // it in legs up to each failure.
    let mut leg_start = start;
    let outcome = loop {
        let until = pending_failures.peek().map(|f| f.1);
        let limits = RunLimits {
            max_ms: until.map_or(cfg.limits.max_ms, |u| {
                u.saturating_sub(leg_start.ms()).max(1)
            }),
            ..cfg.limits
        };
        let mut done = 0;
        let outcome = run(&mut sched, leg_start, limits, |now, r| {
            if now.ms() - last_shown >= 1_000 {
                last_shown = now.ms();
                done = total.saturating_sub(r.waiting + r.in_flight);
                progress(SimProgress {
                    now_ms: now.ms(),
                    done,
                    total,
                    in_flight: r.in_flight,
                });
            }
        })?;
        match (until, outcome.finished) {
            (Some(_), false) if outcome.end.ms() >= until.unwrap_or(0) => {
                let (host, _) = pending_failures.next().expect("peeked");
                sched.migrator_mut().fail_host(&host, outcome.end);
                sched.set_health(
                    &host,
                    crate::model::Health::Unreachable { since: outcome.end },
                )?;
                leg_start = outcome.end;
            }
            _ => break outcome,
        }
    };
    report.sim_wall_ms = clock.elapsed().as_secs_f64() * 1e3;
    let done = sched.plan(&plan.id).expect("the plan").clone();
    report.finished = outcome.finished;
    report.ticks = outcome.ticks;
    report.drain_ms = done
        .entries
        .iter()
        .filter_map(|e| match &e.state {
            EntryState::Migrated { finished_at, .. } => Some(finished_at.ms()),
            EntryState::Terminated { at, .. } => Some(at.ms()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    report.plan_state = format!("{:?}", done.state).to_lowercase();
    report.entries_by_state = done
        .counts()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    report.unfinished = done
        .entries
        .iter()
        .filter(|e| !e.state.is_final())
        .take(10)
        .map(|e| (e.vm.clone(), e.reason.clone().unwrap_or_default()))
        .collect();
    let m = sched.migrator();
    let rec = m.record();
    report.migrations = Migrations {
        started: rec.len(),
        committed: rec
            .iter()
            .filter(|r| r.outcome == Outcome::Committed)
            .count(),
        failed: rec.iter().filter(|r| r.outcome == Outcome::Failed).count(),
        cancelled: rec
            .iter()
            .filter(|r| r.outcome == Outcome::Cancelled)
            .count(),
        retried_vms: done.entries.iter().filter(|e| e.attempts > 1).count(),
        gave_up: done
            .entries
            .iter()
            .filter(|e| e.state == EntryState::Failed)
            .count(),
        terminated: m.ops().iter().filter(|o| !o.boot).count(),
        restarted: m.ops().iter().filter(|o| o.boot).count(),
        moved_twice: {
            let mut seen = std::collections::HashMap::new();
            for r in rec.iter().filter(|r| r.outcome == Outcome::Committed) {
                *seen.entry(r.vm.as_str()).or_insert(0) += 1;
            }
            seen.values().filter(|&&n| n > 1).count()
        },
        gib_sent: rec.iter().map(|r| r.bytes as f64).sum::<f64>() / (1u64 << 30) as f64,
    };
    report.audit = audit(rec, sched.policies());
    report.set_links(m.peaks(), cfg.spec.link_bytes_per_sec);
    report.decisions = Decisions::from_stats(sched.stats());
    Ok(report)
}
