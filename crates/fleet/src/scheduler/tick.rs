//! One step of the scheduler: follow every migration in flight to its end
//! (commit, failure, timeout, a target that failed), ask the planner about
//! every VM that waits, write the decisions down, then carry them out.

use std::time::Instant;

use serde::Serialize;

use super::{Scheduler, SchedulerError};
use crate::migrator::{MigrationRequest, MigrationStatus, Migrator, MigratorError};
use crate::model::Maintenance;
use crate::plan::{Action, EntryState, PlanKind, PlanState};
use crate::planner::{decide, Decision, PlannerInput, RecentStart, WorkAction, WorkItem};
use crate::store::Backend;
use crate::time::Timestamp;

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TickReport {
    pub started: usize,
    pub committed: usize,
    pub retried: usize,
    pub failed: usize,
    pub terminated: usize,
    pub restarted: usize,
    pub in_flight: usize,
    pub waiting: usize,
    pub running_plans: usize,
}

impl<B: Backend, M: Migrator> Scheduler<B, M> {
    pub fn tick(&mut self, now: Timestamp) -> Result<TickReport, SchedulerError> {
        let mut r = TickReport::default();
        self.follow_in_flight(now, &mut r);
        self.plan_round(now, &mut r)?;
        self.finish_plans(now);
        self.persist()?;
        for p in self.plans.iter().filter(|p| p.state == PlanState::Running) {
            r.running_plans += 1;
            for e in &p.entries {
                match e.state {
                    EntryState::Migrating { .. } => r.in_flight += 1,
                    EntryState::Pending => r.waiting += 1,
                    _ => {}
                }
            }
        }
        Ok(r)
    }

    /// Applies a commit if `status` says so.
    pub(super) fn follow_committed(
        &mut self,
        i: usize,
        ei: usize,
        status: Result<MigrationStatus, MigratorError>,
        now: Timestamp,
    ) -> bool {
        let Ok(MigrationStatus::Committed { .. }) = status else {
            return false;
        };
        let e = &mut self.plans[i].entries[ei];
        let EntryState::Migrating {
            target, started_at, ..
        } = &e.state
        else {
            return false;
        };
        let (target, started_at) = (target.clone(), *started_at);
        e.state = EntryState::Migrated {
            target: target.clone(),
            started_at,
            finished_at: now,
        };
        e.reason = None;
        if let (Some(v), Some(h)) = (self.fleet.vm_ix(&e.vm), self.fleet.host_ix(&target)) {
            self.fleet.move_vm(v, h);
            self.dirty_vms.insert(v);
        }
        self.dirty_plans.insert(i);
        true
    }

    /// The attempt failed: try elsewhere, or give up after the last one.
    fn retry_or_fail(
        &mut self,
        i: usize,
        ei: usize,
        failed_target: Option<String>,
        why: String,
        r: &mut super::TickReport,
    ) {
        let max = self.policies.retries.max_attempts;
        let e = &mut self.plans[i].entries[ei];
        e.history.push(format!(
            "attempt {}{}: {why}",
            e.attempts,
            failed_target
                .as_ref()
                .map_or(String::new(), |t| format!(" to {t}"))
        ));
        if let Some(t) = failed_target {
            if !e.avoid.contains(&t) {
                e.avoid.push(t);
            }
        }
        if e.attempts >= max {
            e.state = EntryState::Failed;
            e.reason = Some(format!(
                "gave up after {} attempts (the VM runs on {}); last: {why}",
                e.attempts, e.source
            ));
            r.failed += 1;
        } else {
            e.state = EntryState::Pending;
            e.reason = Some(format!("to retry elsewhere: {why}"));
            r.retried += 1;
        }
        self.dirty_plans.insert(i);
    }

    fn follow_in_flight(&mut self, now: Timestamp, r: &mut TickReport) {
        for i in 0..self.plans.len() {
            if self.plans[i].state != PlanState::Running {
                continue;
            }
            for ei in 0..self.plans[i].entries.len() {
                let EntryState::Migrating {
                    migration,
                    target,
                    deadline,
                    postcopy,
                    ..
                } = &self.plans[i].entries[ei].state
                else {
                    continue;
                };
                let (migration, target, deadline, postcopy) =
                    (migration.clone(), target.clone(), *deadline, *postcopy);
                // A host that does not answer is asked again next tick.
                let Ok(status) = self.migrator.poll(&migration, now) else {
                    continue;
                };
                match status {
                    MigrationStatus::Committed { .. } => {
                        self.follow_committed(i, ei, Ok(status), now);
                        r.committed += 1;
                    }
                    MigrationStatus::Failed { reason } => {
                        self.retry_or_fail(i, ei, Some(target), reason, r)
                    }
                    MigrationStatus::Cancelled => {
                        self.retry_or_fail(i, ei, Some(target), "cancelled on its host".into(), r)
                    }
                    MigrationStatus::Unknown => {
                        let e = &mut self.plans[i].entries[ei];
                        e.state = EntryState::Pending;
                        e.attempts = e.attempts.saturating_sub(1);
                        e.reason = Some("its start never reached the host; it starts again".into());
                        self.dirty_plans.insert(i);
                    }
                    MigrationStatus::Running { .. } => {
                        let target_ix = self.fleet.host_ix(&target);
                        let target_bad = target_ix
                            .map(|h| self.fleet.host(h).refusal_as_target())
                            .unwrap_or(Some(format!("{target} left the fleet")));
                        if let Some(why) = target_bad {
                            let _ = self.migrator.cancel(&migration, now);
                            let status = self.migrator.poll(&migration, now);
                            if !self.follow_committed(i, ei, status, now) {
                                self.retry_or_fail(
                                    i,
                                    ei,
                                    Some(target),
                                    format!("{why} mid-migration: aborted back to the source"),
                                    r,
                                );
                            } else {
                                r.committed += 1;
                            }
                        } else if now >= deadline {
                            self.on_timeout(i, ei, &migration, target, postcopy, now, r);
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_timeout(
        &mut self,
        i: usize,
        ei: usize,
        migration: &str,
        target: String,
        postcopy: bool,
        now: Timestamp,
        r: &mut TickReport,
    ) {
        let vm = self.fleet.vm_ix(&self.plans[i].entries[ei].vm);
        let allow = vm.is_some_and(|v| self.fleet.vm(v).migration.allow_postcopy);
        let timeout = vm.map_or(self.policies.retries.min_completion_timeout_ms, |v| {
            self.policies
                .retries
                .completion_timeout_ms(self.fleet.vm(v).resources.mem_bytes)
        });
        if allow && !postcopy && self.migrator.switch_to_postcopy(migration, now).is_ok() {
            let e = &mut self.plans[i].entries[ei];
            if let EntryState::Migrating {
                deadline, postcopy, ..
            } = &mut e.state
            {
                *postcopy = true;
                *deadline = now.plus_ms(timeout);
            }
            e.history.push(format!(
                "attempt {}: missed its completion timeout; switched to post-copy (allowed by its policy)",
                e.attempts
            ));
            self.dirty_plans.insert(i);
            return;
        }
        let _ = self.migrator.cancel(migration, now);
        let status = self.migrator.poll(migration, now);
        if self.follow_committed(i, ei, status, now) {
            r.committed += 1;
            return;
        }
        self.retry_or_fail(
            i,
            ei,
            Some(target),
            format!(
                "missed its completion timeout of {} s{}",
                timeout / 1000,
                if postcopy { " in post-copy" } else { "" }
            ),
            r,
        );
    }

    fn plan_round(&mut self, now: Timestamp, r: &mut TickReport) -> Result<(), SchedulerError> {
        let mut keys = Vec::new();
        let mut work = Vec::new();
        for i in 0..self.plans.len() {
            if self.plans[i].state != PlanState::Running {
                continue;
            }
            let move_to = match &self.plans[i].kind {
                PlanKind::Move { to: Some(t), .. } => self.fleet.host_ix(t),
                _ => None,
            };
            let priority = self.plans[i].priority;
            for ei in 0..self.plans[i].entries.len() {
                let e = &self.plans[i].entries[ei];
                if e.state != EntryState::Pending {
                    continue;
                }
                let Some(v) = self.fleet.vm_ix(&e.vm) else {
                    let e = &mut self.plans[i].entries[ei];
                    e.state = EntryState::Failed;
                    e.reason = Some("the VM no longer exists".into());
                    self.dirty_plans.insert(i);
                    continue;
                };
                if !self.fleet.vm(v).is_running() {
                    let e = &mut self.plans[i].entries[ei];
                    e.state = EntryState::Failed;
                    e.reason = Some("the VM is no longer running".into());
                    self.dirty_plans.insert(i);
                    continue;
                }
                let now_on = &self.fleet.host(self.fleet.vm_host(v)).name;
                if *now_on != e.source {
                    let on = now_on.clone();
                    let e = &mut self.plans[i].entries[ei];
                    e.state = EntryState::Migrated {
                        target: on,
                        started_at: now,
                        finished_at: now,
                    };
                    e.reason = Some("already off its host (moved under another plan)".into());
                    self.dirty_plans.insert(i);
                    continue;
                }
                let action = match e.action {
                    Action::Migrate => WorkAction::Migrate { to: move_to },
                    Action::Terminate { restart } => WorkAction::Terminate { restart },
                };
                let avoid = e
                    .avoid
                    .iter()
                    .filter_map(|h| self.fleet.host_ix(h))
                    .collect();
                work.push(WorkItem {
                    key: keys.len(),
                    vm: v,
                    priority,
                    action,
                    avoid,
                });
                keys.push((i, ei));
            }
        }
        if work.is_empty() {
            return Ok(());
        }
        let window = self
            .policies
            .pacing
            .per_rack
            .interval_ms
            .max(self.policies.pacing.fleet.interval_ms);
        self.recent.retain(|s| now.since(s.at) < window);
        let in_flight = self.in_flight();
        let clock = Instant::now();
        let decisions = decide(&PlannerInput {
            fleet: &self.fleet,
            policies: &self.policies,
            work: &work,
            in_flight: &in_flight,
            recent_starts: &self.recent,
            now,
        });
        self.stats.round_ns.push(clock.elapsed().as_nanos() as u64);
        self.stats.vm_decisions += decisions.len() as u64;
        self.stats.max_work = self.stats.max_work.max(work.len());

        let mut starts = Vec::new();
        for d in decisions {
            let (i, ei) = keys[d.key()];
            match d {
                Decision::Migrate {
                    vm, source, target, ..
                } => {
                    let vm_rec = self.fleet.vm(vm);
                    let timeout = self
                        .policies
                        .retries
                        .completion_timeout_ms(vm_rec.resources.mem_bytes);
                    let target_name = self.fleet.host(target).name.clone();
                    let plan_id = self.plans[i].id.clone();
                    let e = &mut self.plans[i].entries[ei];
                    e.attempts += 1;
                    let id = format!("{plan_id}/{}/{}", e.vm, e.attempts);
                    e.state = EntryState::Migrating {
                        migration: id.clone(),
                        target: target_name.clone(),
                        started_at: now,
                        deadline: now.plus_ms(timeout),
                        postcopy: false,
                    };
                    e.target = Some(target_name.clone());
                    e.reason = None;
                    self.recent.push(RecentStart { at: now, source });
                    starts.push((
                        i,
                        ei,
                        MigrationRequest {
                            id,
                            vm: vm_rec.id.clone(),
                            source: self.fleet.host(source).name.clone(),
                            target: target_name,
                            allow_postcopy: vm_rec.migration.allow_postcopy,
                            completion_timeout_ms: timeout,
                        },
                    ));
                    self.dirty_plans.insert(i);
                }
                Decision::Terminate {
                    vm,
                    restart_on,
                    note,
                    ..
                } => {
                    self.terminate(i, ei, vm, restart_on, note, now, r);
                }
                Decision::Wait { reason, .. } => {
                    let e = &mut self.plans[i].entries[ei];
                    let text = reason.to_string();
                    if e.reason.as_deref() != Some(text.as_str()) {
                        e.reason = Some(text);
                        self.dirty_plans.insert(i);
                    }
                }
            }
        }
        // Written down before any is started: see crate::migrator.
        self.persist()?;
        for (i, ei, req) in starts {
            match self.migrator.start(&req, now) {
                Ok(()) => r.started += 1,
                Err(e) => {
                    let target = match &e {
                        MigratorError::Refused { .. } => Some(req.target.clone()),
                        _ => None,
                    };
                    self.retry_or_fail(i, ei, target, e.to_string(), r);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn terminate(
        &mut self,
        i: usize,
        ei: usize,
        vm: usize,
        restart_on: Option<usize>,
        note: Option<crate::planner::WaitReason>,
        now: Timestamp,
        r: &mut TickReport,
    ) {
        let record = self.fleet.vm(vm).clone();
        if let Err(e) = self.migrator.terminate(&record, now) {
            let e_ = &mut self.plans[i].entries[ei];
            e_.reason = Some(format!("terminate per policy: {e}; trying again"));
            self.dirty_plans.insert(i);
            return;
        }
        r.terminated += 1;
        let mut restarted = None;
        let mut reason = note.map(|n| match n {
            crate::planner::WaitReason::TerminatePerPolicy => n.to_string(),
            other => format!("terminated per policy; not restarted: {other}"),
        });
        if let Some(h) = restart_on {
            let name = self.fleet.host(h).name.clone();
            match self.migrator.boot(&record, &name, now) {
                Ok(()) => {
                    self.fleet.move_vm(vm, h);
                    restarted = Some(name.clone());
                    reason = Some(format!(
                        "terminated per policy; restarted on {name} (automatic_restart)"
                    ));
                    r.restarted += 1;
                }
                Err(e) => reason = Some(format!("terminated per policy; restart failed: {e}")),
            }
        }
        if restarted.is_none() {
            self.fleet.stop_vm(vm);
        }
        self.dirty_vms.insert(vm);
        let e = &mut self.plans[i].entries[ei];
        e.state = EntryState::Terminated {
            restarted_on: restarted.clone(),
            at: now,
        };
        e.target = restarted;
        e.reason = reason;
        self.dirty_plans.insert(i);
    }

    fn finish_plans(&mut self, now: Timestamp) {
        for i in 0..self.plans.len() {
            let p = &self.plans[i];
            if p.state != PlanState::Running || !p.entries.iter().all(|e| e.state.is_final()) {
                continue;
            }
            let drain = matches!(p.kind, PlanKind::Drain { .. });
            let hosts = p.kind.hosts().to_vec();
            let p = &mut self.plans[i];
            p.state = PlanState::Done;
            p.finished_at = Some(now);
            self.dirty_plans.insert(i);
            for name in hosts {
                let Some(h) = self.fleet.host_ix(&name) else {
                    continue;
                };
                // A drained host that still runs a VM (one failed) stays
                // draining: it is not handed over with a VM on it.
                if drain && self.fleet.vms_on(h).next().is_none() {
                    self.fleet.set_maintenance(h, Maintenance::InMaintenance);
                    self.dirty_hosts.insert(h);
                }
            }
        }
    }
}
