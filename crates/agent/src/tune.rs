//! `PATCH /v1/migrations/{id}`: retuning a migration while it runs (like
//! libvirt's `migrate-setspeed` and `migrate-setmaxdowntime`). The agent
//! checks the request against the job and the VM's policy, then hands it
//! to the source VMM's API thread, whose engine takes a new bandwidth cap
//! at its next batch and a new downtime target or a switch to post-copy
//! between rounds.

use ferry_control::{Request, Response, TuneRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::ApiError;
use crate::migration::{JobPhase, MigrationJob};
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
        let view = lock(&job.view).clone();
        if view.phase.is_done() {
            return Err(ApiError::Conflict(format!(
                "migration {id} has ended ({}): nothing to tune",
                view.phase.as_str()
            )));
        }
        if view.phase != JobPhase::Transferring {
            return Err(ApiError::Conflict(format!(
                "migration {id} is {}: its data plane has not started yet; try again in a moment",
                view.phase.as_str()
            )));
        }
        let record = self.record(&view.vm)?;
        if tune.postcopy {
            if !record.policy.allow_postcopy {
                return Err(ApiError::Incompatible(format!(
                    "VM {}'s policy does not allow post-copy (allow_postcopy is false): a crash of either host during post-copy would lose the VM",
                    view.vm
                )));
            }
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
        match supervisor::call(&record.api_socket, Request::TuneMigration(tune)).await {
            Ok(Response::TuneRequested { migrating: true }) => Ok(lock(&job.view).clone()),
            Ok(Response::TuneRequested { migrating: false }) => Err(ApiError::Conflict(format!(
                "migration {id}: the VMM has no migration under way any more (it is ending)"
            ))),
            Ok(Response::Error { message }) => Err(ApiError::BadRequest(message)),
            Ok(other) => Err(ApiError::Vmm(format!(
                "the VMM answered the retune with {other:?}"
            ))),
            Err(e) => Err(ApiError::Vmm(format!(
                "cannot reach the source VMM to retune: {e}"
            ))),
        }
    }
}
