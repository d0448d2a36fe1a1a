//! `PATCH /v1/migrations/{id}`: retuning a migration while it runs (like
//! libvirt's `migrate-setspeed` and `migrate-setmaxdowntime`). The agent
//! checks the request against the job and the VM's policy. While the job
//! prepares it keeps the new settings and the engine starts with them;
//! once the data plane runs it hands them to the source VMM's API thread,
//! whose engine takes a new bandwidth cap at its next batch and a new
//! downtime target or a switch to post-copy between rounds. The job's
//! view shows the settings in force.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_control::{Request, Response, TuneRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::ApiError;
use crate::migration::{Handoff, JobSlot, MigrationJob};
use crate::server::{lock, Agent};
use crate::supervisor;

/// The longest downtime target accepted: an hour.
const MAX_DOWNTIME_MS: f64 = 3.6e6;

/// `PATCH /v1/migrations/{id}`: the settings to change; at least one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TuneMigration {
    /// A new downtime target, milliseconds (0 to 3600000).
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// A new send-rate cap in bytes per second; 0: uncapped.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// `postcopy`: switch to post-copy after the round under way (only
    /// where the VM's policy allows post-copy).
    #[serde(default)]
    pub mode: Option<String>,
}

impl TuneMigration {
    /// The engine's form of a request that makes sense on its own.
    fn checked(&self) -> Result<TuneRequest, ApiError> {
        if self.downtime_ms.is_none() && self.bandwidth.is_none() && self.mode.is_none() {
            return Err(ApiError::BadRequest(
                "nothing to change: give downtime_ms, bandwidth or mode".into(),
            ));
        }
        if let Some(ms) = self.downtime_ms {
            if !ms.is_finite() || !(0.0..=MAX_DOWNTIME_MS).contains(&ms) {
                return Err(ApiError::BadRequest(format!(
                    "downtime_ms {ms} is not a duration from 0 to {MAX_DOWNTIME_MS} ms"
                )));
            }
        }
        let postcopy = match self.mode.as_deref() {
            None => false,
            Some("postcopy") => true,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "mode {other:?}: a running migration can only switch to \"postcopy\""
                )))
            }
        };
        Ok(TuneRequest {
            downtime_ms: self.downtime_ms,
            bandwidth: self.bandwidth,
            postcopy,
        })
    }
}

/// How long a retune waits for a source VMM that has the migration
/// request but has not started its engine yet.
const ENGINE_START_WAIT: Duration = Duration::from_secs(10);
const ENGINE_START_POLL: Duration = Duration::from_millis(20);

/// Writes what `tune` changes into the job's view.
fn show_tune(job: &JobSlot, tune: &TuneRequest) {
    let mut v = lock(&job.view);
    if let Some(ms) = tune.downtime_ms {
        v.downtime_target_ms = Some(ms);
    }
    if let Some(b) = tune.bandwidth {
        v.bandwidth_cap = (b > 0).then_some(b);
    }
}

impl Agent {
    /// `PATCH /v1/migrations/{id}`.
    pub async fn tune_migration(
        &self,
        id: &str,
        req: TuneMigration,
    ) -> Result<MigrationJob, ApiError> {
        let tune = req.checked()?;
        let job = lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        let ended = |job: &JobSlot| {
            let phase = lock(&job.view).phase;
            phase.is_done().then(|| {
                ApiError::Conflict(format!(
                    "migration {id} has ended ({}): nothing to tune",
                    phase.as_str()
                ))
            })
        };
        if let Some(e) = ended(&job) {
            return Err(e);
        }
        let view = lock(&job.view).clone();
        let record = self.record(&view.vm)?;
        if tune.postcopy && !record.policy.allow_postcopy {
            return Err(ApiError::Incompatible(format!(
                "VM {}'s policy does not allow post-copy (allow_postcopy is false): a crash of either host during post-copy would lose the VM",
                view.vm
            )));
        }
        {
            let handoff = lock(&job.handoff);
            match *handoff {
                Handoff::Cancelled => {
                    return Err(ApiError::Conflict(format!(
                        "migration {id} was cancelled while preparing: nothing to tune"
                    )))
                }
                // Kept, under the lock the hand-off takes: the engine
                // starts with it.
                Handoff::Agent => {
                    if tune.postcopy && record.definition.disk.as_ref().is_some_and(|d| d.local) {
                        return Err(ApiError::Incompatible(format!(
                            "VM {}'s disk is copied with it, which only pre-copy does safely",
                            view.vm
                        )));
                    }
                    show_tune(&job, &tune);
                    if tune.postcopy {
                        job.postcopy_asked.store(true, Ordering::SeqCst);
                        lock(&job.view).mode = "postcopy".into();
                    }
                    return Ok(lock(&job.view).clone());
                }
                Handoff::Engine => {}
            }
        }
        if tune.postcopy {
            let view = lock(&job.view).clone();
            let engine_phase = view.last_progress.as_ref().map(|p| p.phase.as_str());
            let in_precopy = view.mode != "postcopy"
                && matches!(engine_phase, None | Some("setup" | "round" | "note"));
            if !in_precopy {
                return Err(ApiError::Conflict(format!(
                    "migration {id} is past its pre-copy rounds (mode {}, engine phase {}): it can no longer switch to post-copy",
                    view.mode,
                    engine_phase.unwrap_or("unknown")
                )));
            }
        }
        let deadline = Instant::now() + ENGINE_START_WAIT;
        loop {
            match supervisor::call(&record.api_socket, Request::TuneMigration(tune.clone())).await {
                Ok(Response::TuneRequested { migrating: true }) => {
                    show_tune(&job, &tune);
                    return Ok(lock(&job.view).clone());
                }
                // Not started yet, or ending: said below.
                Ok(Response::TuneRequested { migrating: false }) => {}
                Ok(Response::Error { message }) => return Err(ApiError::BadRequest(message)),
                Ok(other) => {
                    return Err(ApiError::Vmm(format!(
                        "the VMM answered the retune with {other:?}"
                    )))
                }
                Err(e) => {
                    return Err(ended(&job).unwrap_or_else(|| {
                        ApiError::Vmm(format!("cannot reach the source VMM to retune: {e}"))
                    }))
                }
            }
            if let Some(e) = ended(&job) {
                return Err(e);
            }
            let ending = lock(&job.view)
                .last_progress
                .as_ref()
                .is_some_and(|p| p.phase == "committed");
            if ending || Instant::now() > deadline {
                return Err(ApiError::Conflict(format!(
                    "migration {id}: the VMM has no migration under way any more (it is ending)"
                )));
            }
            tokio::time::sleep(ENGINE_START_POLL).await;
        }
    }
}
