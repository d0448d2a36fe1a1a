//! `DELETE /v1/migrations/{id}`: an operator's cancel of an outgoing
//! migration.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use ferry_control::{Request, Response};

use super::{JobPhase, MigrationJob};
use crate::api::ApiError;
use crate::server::{lock, Agent};
use crate::supervisor;

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
