//! `DELETE /v1/migrations/{id}`: an operator's cancel of an outgoing
//! migration, and when a cancel can no longer keep the VM on the source.
//!
//! The verdict is exact. Before the job hands the migration to the
//! source VMM, the agent decides (under the job's hand-off lock); after,
//! the engine's cancel state does: a cancel that wins its compare-and-swap
//! before the engine seals it at the start of the blackout (or of
//! post-copy) is accepted (202) and the VM stays on the source; one that
//! loses is refused (409) with the reason, and the migration commits.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_control::{Request, Response};
use ferry_migration::cancel::Sealed;

use super::job::Handoff;
use super::{JobSlot, MigrationJob};
use crate::api::ApiError;
use crate::server::{lock, Agent};
use crate::supervisor;

/// How long a cancel waits for a source VMM that has the migration
/// request but has not started its engine yet (it picks requests up
/// between console events: milliseconds).
const ENGINE_START_WAIT: Duration = Duration::from_secs(10);
const ENGINE_START_POLL: Duration = Duration::from_millis(20);

/// How far past the last point that honours a cancel the engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PastCancel {
    /// The VM is paused for its last pages: the commit follows.
    Blackout,
    /// The VM runs on the destination; part of its memory is still here.
    Postcopy,
    /// The VM runs on the destination.
    Committed,
}

impl PastCancel {
    /// What an engine progress line's phase says; None: a cancel still
    /// holds there. (The engine sealed before it said any of these.)
    pub(crate) fn of(phase: &str) -> Option<Self> {
        match phase {
            "blackout" => Some(Self::Blackout),
            "postcopy" => Some(Self::Postcopy),
            "committed" => Some(Self::Committed),
            _ => None,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Blackout => Sealed::Blackout.reason(),
            Self::Postcopy => Sealed::Postcopy.reason(),
            Self::Committed => "the migration has committed; the VM runs on the destination",
        }
    }
}

impl From<Sealed> for PastCancel {
    fn from(s: Sealed) -> Self {
        match s {
            Sealed::Blackout => Self::Blackout,
            Sealed::Postcopy => Self::Postcopy,
        }
    }
}

fn refused(id: &str, past: PastCancel) -> ApiError {
    ApiError::Conflict(format!(
        "migration {id} cannot be cancelled: {}",
        past.reason()
    ))
}

fn ended(id: &str, job: &JobSlot) -> ApiError {
    ApiError::Conflict(format!(
        "migration {id} has ended ({}): nothing to cancel",
        job.snapshot().phase.as_str()
    ))
}

impl Agent {
    /// `DELETE /v1/migrations/{id}`: the job (202) only for a cancel that
    /// keeps the VM on the source.
    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationJob, ApiError> {
        let job = lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        if job.snapshot().phase.is_done() {
            return Err(ended(id, &job));
        }
        if let Some(past) = *lock(&job.past_cancel) {
            return Err(refused(id, past));
        }
        {
            let mut handoff = lock(&job.handoff);
            if *handoff != Handoff::Engine {
                *handoff = Handoff::Cancelled;
                job.cancel.store(true, Ordering::SeqCst);
                return Ok(job.snapshot());
            }
        }
        let socket = self
            .record(&job.snapshot().vm)
            .map(|r| r.api_socket)
            .unwrap_or_else(|_| PathBuf::new());
        let deadline = Instant::now() + ENGINE_START_WAIT;
        loop {
            // The owner thread of the VMM is inside the migration; its API
            // thread races the engine's seal and answers at once.
            match supervisor::call(&socket, Request::CancelMigration).await {
                Ok(Response::CancelRequested { migrating: true }) => {
                    job.cancel.store(true, Ordering::SeqCst);
                    return Ok(job.snapshot());
                }
                Ok(Response::CancelRefused { sealed, reason }) => {
                    tracing::info!("cancel {id} refused by the engine: {reason}");
                    let past = PastCancel::from(sealed);
                    lock(&job.past_cancel).get_or_insert(past);
                    return Err(refused(id, past));
                }
                // The engine has not started yet, or has just ended.
                Ok(Response::CancelRequested { migrating: false }) => {}
                Ok(Response::Error { message }) => {
                    return Err(ApiError::Vmm(format!(
                        "the source VMM refused the cancel: {message}"
                    )))
                }
                Ok(other) => {
                    return Err(ApiError::Vmm(format!(
                        "the source VMM answered the cancel with {other:?}"
                    )))
                }
                // Its VMM gone with the job ending: said below.
                Err(e) if job.snapshot().phase.is_done() => {
                    tracing::debug!("cancel {id}: {e}");
                }
                Err(e) => {
                    return Err(ApiError::Vmm(format!(
                        "cannot reach the source VMM to cancel (nothing was cancelled): {e}"
                    )))
                }
            }
            if let Some(past) = *lock(&job.past_cancel) {
                return Err(refused(id, past));
            }
            if job.snapshot().phase.is_done() {
                return Err(ended(id, &job));
            }
            if Instant::now() > deadline {
                return Err(ApiError::Vmm(format!(
                    "migration {id}: the source VMM has not started its migration within {} s; nothing was cancelled, try again",
                    ENGINE_START_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(ENGINE_START_POLL).await;
        }
    }
}
