//! `DELETE /v1/migrations/{id}`: an operator's cancel of an outgoing
//! migration, and when a cancel can no longer keep the VM on the source.
//!
//! The engine honours a cancel between its pre-copy rounds. From the
//! blackout on it no longer looks, and once the VM runs on the
//! destination (post-copy, or committed) stopping would lose it: such a
//! cancel is refused (409) with the reason, instead of being accepted
//! and then overtaken by the commit.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use ferry_control::{Request, Response};

use super::{JobPhase, MigrationJob};
use crate::api::ApiError;
use crate::server::{lock, Agent};
use crate::supervisor;

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
    /// holds there.
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
            Self::Blackout => "the blackout has begun: the migration is committing and the VM will run on the destination",
            Self::Postcopy => "post-copy in progress: cancelling would lose the VM (it runs on the destination while part of its memory is still here)",
            Self::Committed => "the migration has committed; the VM runs on the destination",
        }
    }
}

impl Agent {
    /// `DELETE /v1/migrations/{id}`.
    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationJob, ApiError> {
        let job = lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        let view = job.snapshot();
        if view.phase.is_done() {
            return Err(ApiError::Conflict(format!(
                "migration {id} has ended ({}): nothing to cancel",
                view.phase.as_str()
            )));
        }
        if let Some(past) = *lock(&job.past_cancel) {
            return Err(ApiError::Conflict(format!(
                "migration {id} cannot be cancelled: {}",
                past.reason()
            )));
        }
        job.cancel.store(true, Ordering::SeqCst);
        if view.phase == JobPhase::Transferring {
            // The owner thread of the VMM is inside the migration; its API
            // thread sets the engine's cancel flag and answers at once.
            let socket = self
                .record(&view.vm)
                .map(|r| r.api_socket)
                .unwrap_or_else(|_| PathBuf::new());
            match supervisor::call(&socket, Request::CancelMigration).await {
                Ok(Response::Error { message }) => tracing::warn!("cancel {id}: {message}"),
                Err(e) => tracing::warn!("cancel {id}: {e}"),
                Ok(_) => {}
            }
        }
        Ok(job.snapshot())
    }
}
