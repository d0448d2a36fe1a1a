//! Outgoing migration jobs written down under the state directory
//! (`jobs/JOB.json`), so that a source agent killed mid-migration settles
//! each one when it starts again: committed (the destination has the VM;
//! the record here goes) or aborted (the VM runs here, re-adopted), never
//! both and never neither.
//!
//! The truth is the destination's: its receiver reports the commit only
//! once the VM runs there. The source VMM, which outlives the agent, keeps
//! migrating meanwhile and ends by itself either way.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::events::{AuditEntry, Caller};
use crate::migration::{IncomingPhase, IncomingView, JobPhase, MigrationJob, MigrationTarget};
use crate::server::{lock, Agent};
use crate::time::now_rfc3339;

/// How long a restarted agent keeps asking the destination about a job
/// it left in flight before it decides from its own VMM alone.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// What is kept of a job across a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub id: String,
    pub vm: String,
    pub target: MigrationTarget,
    /// The destination's id of its incoming migration.
    pub destination_migration: String,
    pub phase: JobPhase,
    pub transport: String,
    pub requested_by: Caller,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub error: Option<String>,
    /// What sending the VM cost this host, for a committed job
    /// (crate::fleet_figures); none in files older agents wrote.
    #[serde(default)]
    pub measured: Option<SendMeasured>,
}

/// One committed outgoing migration as this (source) host lived it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SendMeasured {
    /// From the start asked for to the job committed.
    pub total_ms: u64,
    /// The offer to the destination, to its answer (its VMM started).
    pub prepare_call_ms: u64,
    /// The engine's own span: the connection to the commit acknowledged.
    pub engine_ms: u64,
}

impl SendMeasured {
    /// What the job spent outside the destination's preparation and the
    /// engine: its start, and after the commit, the confirmation and the
    /// old VMM's stop.
    pub fn own_ms(&self) -> u64 {
        self.total_ms
            .saturating_sub(self.prepare_call_ms)
            .saturating_sub(self.engine_ms)
    }
}

impl JobFile {
    pub fn of(job: &MigrationJob) -> Option<Self> {
        Some(Self {
            id: job.id.clone(),
            vm: job.vm.clone(),
            target: job.target.clone(),
            destination_migration: job.destination_migration.clone()?,
            phase: job.phase,
            transport: job.transport.clone(),
            requested_by: job.requested_by.clone(),
            started_at: job.started_at.clone(),
            ended_at: job.ended_at.clone(),
            error: job.error.clone(),
            measured: None,
        })
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jobs")
}

/// Writes the job durably: a crash leaves the old version or the new one.
pub fn save(state_dir: &Path, job: &JobFile) -> std::io::Result<()> {
    crate::durable::write_json(&dir(state_dir), &job.id, job)
}

/// Every job on file; unreadable files are logged and skipped.
pub fn load(state_dir: &Path) -> Vec<JobFile> {
    crate::durable::read_all_json(&dir(state_dir), "job")
}

/// How a settled job ended.
enum Settled {
    Committed,
    Aborted(String),
}

impl Agent {
    /// Settles a job a previous agent left in flight (see the module's
    /// doc); runs until it is settled or [`SETTLE_LIMIT`] has passed.
    pub(crate) async fn settle(self: Arc<Self>, file: JobFile) {
        let vm = file.vm.clone();
        tracing::info!(
            "migration {} of VM {vm} to {} was in flight when ferryd stopped: settling it",
            file.id,
            file.target.host
        );
        // The token file the killed agent left (its VMM read it long ago).
        let _ =
            std::fs::remove_file(dir(&self.config.state_dir).join(format!("{}.token", file.id)));
        let verdict = self.ask_until_settled(&file).await;
        let slot = lock(&self.slots).get(&vm).cloned();
        let (phase, error) = match verdict {
            Settled::Committed => {
                if let (Some(slot), Ok(record)) = (&slot, self.record(&vm)) {
                    slot.departing.store(true, Ordering::SeqCst);
                    self.stop_departed(slot).await;
                    self.migrated_away(slot, &record, &file.target);
                }
                (JobPhase::Committed, None)
            }
            Settled::Aborted(why) => {
                if let Some(slot) = &slot {
                    slot.departing.store(false, Ordering::SeqCst);
                    self.source_kept(slot, &vm, &why).await;
                }
                (JobPhase::Failed, Some(why))
            }
        };
        if let Some(slot) = &slot {
            *lock(&slot.job) = None;
        }
        let mut ended = file.clone();
        ended.phase = phase;
        ended.error = error.clone();
        ended.ended_at = Some(now_rfc3339());
        if let Err(e) = save(&self.config.state_dir, &ended) {
            tracing::error!("cannot write job {}: {e}", ended.id);
        }
        self.apply_retention();
        if let Some(job) = lock(&self.jobs).get(&file.id) {
            let mut v = lock(&job.view);
            v.phase = phase;
            v.error = error.clone();
            v.ended_at = ended.ended_at.clone();
        }
        self.metrics.migration_ended(phase.as_str());
        tracing::info!(
            "migration {} of VM {vm}: settled after a restart: {}{}",
            file.id,
            phase.as_str(),
            error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        self.events.audit(AuditEntry {
            time: now_rfc3339(),
            who: file.requested_by.clone(),
            action: format!(
                "migration {} to {} (settled after a restart)",
                file.id, file.target.host
            ),
            vm: Some(vm),
            outcome: if phase == JobPhase::Committed {
                "ok"
            } else {
                "failed"
            }
            .into(),
            status: 0,
            reason: error,
        });
    }

    async fn ask_until_settled(&self, file: &JobFile) -> Settled {
        let Some(client) = self.peer_tls.as_ref().map(|t| t.client.clone()) else {
            return Settled::Aborted("this host has no TLS identity any more".into());
        };
        let path = format!("/v1/peer/migrations/{}", file.destination_migration);
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            match crate::peer::call(
                &client,
                &file.target.host,
                &file.target.address,
                "GET",
                &path,
                None,
            )
            .await
            {
                Ok(r) if r.is_success() => match serde_json::from_slice::<IncomingView>(&r.body) {
                    Ok(v) => match v.phase {
                        IncomingPhase::Committed => return Settled::Committed,
                        IncomingPhase::Ready => last = "the destination still waits".into(),
                        other => {
                            return Settled::Aborted(format!(
                                "the source agent restarted mid-migration; {} says {other:?}: {}; the VM runs on the source",
                                file.target.host,
                                v.reason.unwrap_or_default()
                            ))
                        }
                    },
                    Err(e) => last = e.to_string(),
                },
                Ok(r) => last = format!("{} {}", r.status, r.reason()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The destination never committed in time: withdraw the offer.
        // Its receiver stops; the source VMM's migration then fails and
        // the VM runs on here. A destination that committed meanwhile
        // refuses the withdrawal (409): then it has the VM.
        if let Ok(r) = crate::peer::call(
            &client,
            &file.target.host,
            &file.target.address,
            "DELETE",
            &path,
            None,
        )
        .await
        {
            if r.status == 409 {
                return Settled::Committed;
            }
        }
        Settled::Aborted(format!(
            "the source agent restarted mid-migration and the destination did not report a commit within {SETTLE_LIMIT:?} ({last}); withdrawn, the VM runs on the source"
        ))
    }
}

impl Agent {
    /// After a commit the source VMM stops by itself; one still there
    /// after a grace no longer owns the VM and is killed.
    async fn stop_departed(&self, slot: &crate::server::Slot) {
        let Some((handle, mut exited)) = lock(&slot.vmm).clone() else {
            return;
        };
        let gone =
            tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| e.is_some())).await;
        if gone.is_err() {
            tracing::warn!("the source VMM of a committed migration did not exit: killing it");
            let _ = handle.signal(rustix::process::Signal::KILL);
        }
    }

    /// The VM stayed here: running if its VMM lives, failed if not.
    async fn source_kept(&self, slot: &crate::server::Slot, vm: &str, why: &str) {
        let Ok(mut record) = self.record(vm) else {
            return;
        };
        if lock(&slot.vmm).is_some() {
            if record.state != crate::model::VmState::Running {
                self.set_state(&mut record, crate::model::VmState::Running, None);
            }
        } else {
            self.set_state(
                &mut record,
                crate::model::VmState::Failed,
                Some(format!("{why}; but its VMM is gone")),
            );
        }
    }
}
