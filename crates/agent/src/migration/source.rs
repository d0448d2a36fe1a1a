//! The source's side of an outgoing migration: checks, the offer to the
//! destination, and the source VMM's migration with its progress.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_control::{MigrateRequest, Request, Response};
use ferry_migration::mode::Mode;
use ferry_migration::transport::SessionToken;

use super::cancel::PastCancel;
use super::{
    mutual_tls, JobPhase, JobProgress, JobSlot, MigrationJob, MigrationTarget, PeerOffer, Prepared,
    StartMigration, PLAINTEXT,
};
use crate::api::ApiError;
use crate::events::{AuditEntry, Caller, Event};
use crate::model::{VmRecord, VmState};
use crate::server::{lock, Agent, Slot};
use crate::supervisor;
use crate::time::now_rfc3339;

impl Agent {
    fn peer_client(&self) -> Result<Arc<rustls::ClientConfig>, ApiError> {
        self.peer_tls
            .as_ref()
            .map(|t| t.client.clone())
            .ok_or_else(|| {
                ApiError::Incompatible(
                    "this host has no tls_dir in its config: it cannot reach other agents".into(),
                )
            })
    }

    /// `POST /v1/vms/{id}/migrations`: checks, takes the VM's lock and
    /// starts the job.
    pub async fn start_migration(
        self: &Arc<Self>,
        caller: &Caller,
        vm: &str,
        req: StartMigration,
    ) -> Result<MigrationJob, ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        if let Err(e) = ferry_identity::validate_name(&req.target.host) {
            return bad(format!("target.host {:?}: {e}", req.target.host));
        }
        if req.target.host.eq_ignore_ascii_case(&self.config.host_name) {
            return bad(format!(
                "target.host {}: that is this host",
                req.target.host
            ));
        }
        if req.target.address.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "target.address {:?}: not an IP:port",
                req.target.address
            ));
        }
        let mode: Mode = match req.mode.as_deref().unwrap_or("precopy").parse() {
            Ok(m) => m,
            Err(e) => return bad(format!("mode: {e}")),
        };
        if req.downtime_ms.is_some_and(|d| !(d.is_finite() && d > 0.0))
            || req
                .max_downtime_ms
                .is_some_and(|d| !(d.is_finite() && d > 0.0))
            || req.bandwidth == Some(0)
            || req.streams == Some(0)
        {
            return bad(
                "downtime_ms, max_downtime_ms, bandwidth and streams must be above zero".into(),
            );
        }
        let slot = self.slot(vm)?;
        let record = self.record(vm)?;
        let mode = match mode {
            Mode::Postcopy | Mode::Hybrid if !record.policy.allow_postcopy => {
                return Err(ApiError::Incompatible(format!(
                    "mode {}: VM {vm}'s policy does not allow post-copy",
                    req.mode.as_deref().unwrap_or_default()
                )))
            }
            // Auto may pick post-copy; the policy forbids it: pre-copy.
            Mode::Auto if !record.policy.allow_postcopy => Mode::Precopy,
            m => m,
        };
        let client = self.peer_client()?;
        let guard = Self::begin(&slot, vm)?;
        let record = self.record(vm)?;
        if record.state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM {vm} is {}: only a running VM can be migrated",
                record.state.as_str()
            )));
        }
        let id = format!("mig-{:08x}", rand::random::<u32>());
        let view = MigrationJob {
            id: id.clone(),
            vm: vm.to_owned(),
            source: self.config.host_name.clone(),
            target: req.target.clone(),
            phase: JobPhase::Preparing,
            transport: PLAINTEXT.into(),
            mode: format!("{mode:?}").to_lowercase(),
            downtime_target_ms: Some(req.downtime_ms.unwrap_or(record.policy.downtime_ms)),
            bandwidth_cap: req.bandwidth.or(record.policy.bandwidth),
            destination_migration: None,
            data_plane: None,
            progress: None,
            last_progress: None,
            progress_lines: 0,
            report: None,
            error: None,
            destination_told: None,
            destination_note: None,
            requested_by: caller.clone(),
            started_at: now_rfc3339(),
            ended_at: None,
        };
        let job = Arc::new(JobSlot::new(view.clone()));
        *lock(&slot.job) = Some(id.clone());
        lock(&self.jobs).insert(id.clone(), job.clone());
        self.events.publish(Event::Migration {
            time: now_rfc3339(),
            job: id.clone(),
            vm: vm.to_owned(),
            phase: JobPhase::Preparing,
            reason: None,
        });
        let agent = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            agent.run_job(client, slot, job, record, req, mode).await;
        });
        Ok(view)
    }

    pub(crate) fn set_phase(&self, job: &JobSlot, phase: JobPhase, reason: Option<String>) {
        let (id, vm) = {
            let mut v = lock(&job.view);
            v.phase = phase;
            if reason.is_some() {
                v.error = reason.clone();
            }
            if phase.is_done() {
                v.ended_at = Some(now_rfc3339());
            }
            (v.id.clone(), v.vm.clone())
        };
        self.events.publish(Event::Migration {
            time: now_rfc3339(),
            job: id,
            vm,
            phase,
            reason,
        });
    }

    async fn run_job(
        self: Arc<Self>,
        client: Arc<rustls::ClientConfig>,
        slot: Arc<Slot>,
        job: Arc<JobSlot>,
        record: VmRecord,
        req: StartMigration,
        mode: Mode,
    ) {
        let (phase, reason) = match self.drive(&client, &slot, &job, &record, &req, mode).await {
            Ok(()) => (JobPhase::Committed, None),
            Err(reason) if job.timed_out.load(Ordering::SeqCst) => (
                JobPhase::Failed,
                Some(format!(
                    "not done within the policy's completion timeout of {} ms ({reason}); the VM runs on the source",
                    record.policy.completion_timeout_ms
                )),
            ),
            Err(reason) if job.cancelled() => (JobPhase::Cancelled, Some(reason)),
            Err(reason) => (JobPhase::Failed, Some(reason)),
        };
        // The outcome says whether the destination was told to let go.
        let reason = match (reason, lock(&job.view).destination_note.clone()) {
            (Some(r), Some(note)) if phase != JobPhase::Committed => Some(format!("{r}; {note}")),
            (r, _) => r,
        };
        // After a commit the old VMM's exit stays no failure: it may come
        // after the VM has come back here under the same id.
        if phase != JobPhase::Committed {
            slot.departing.store(false, Ordering::SeqCst);
        }
        *lock(&slot.job) = None;
        if phase == JobPhase::Committed {
            if let (Some(prepare_call_ms), Some(engine_ms)) = *lock(&job.spans) {
                let m = crate::jobs::SendMeasured {
                    total_ms: job.started.elapsed().as_millis() as u64,
                    prepare_call_ms,
                    engine_ms,
                };
                tracing::info!(
                    "migration {}: {} ms in all, {} ms of it preparing the destination, {} ms in the engine",
                    lock(&job.view).id,
                    m.total_ms,
                    m.prepare_call_ms,
                    m.engine_ms
                );
                *lock(&job.measured) = Some(m);
            }
        }
        self.set_phase(&job, phase, reason.clone());
        self.save_job(&job);
        self.apply_retention();
        let view = job.snapshot();
        if let Some(report) = &view.report {
            self.metrics.migration_moved(
                report.bytes_sent,
                (phase == JobPhase::Committed).then_some(report.blackout.host_downtime_ms),
            );
        }
        self.metrics.migration_ended(phase.as_str());
        tracing::info!(
            "migration {} of VM {} to {}: {}{}",
            view.id,
            view.vm,
            view.target.host,
            phase.as_str(),
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        self.events.audit(AuditEntry {
            time: now_rfc3339(),
            who: view.requested_by.clone(),
            action: format!("migration {} to {}", view.id, view.target.host),
            vm: Some(view.vm.clone()),
            outcome: match phase {
                JobPhase::Committed => "ok",
                JobPhase::Cancelled => "cancelled",
                _ => "failed",
            }
            .into(),
            status: 0,
            reason,
        });
    }

    async fn drive(
        self: &Arc<Self>,
        client: &Arc<rustls::ClientConfig>,
        slot: &Arc<Slot>,
        job: &Arc<JobSlot>,
        record: &VmRecord,
        req: &StartMigration,
        mode: Mode,
    ) -> Result<(), String> {
        let target = &req.target;
        let offer = PeerOffer {
            job: job.snapshot().id,
            vm: record.id.clone(),
            definition: record.definition.clone(),
            policy: record.policy.clone(),
            plaintext_data_plane: self.config.insecure_plaintext_data_plane,
        };
        let body = serde_json::to_value(&offer).map_err(|e| e.to_string())?;
        let offered = std::time::Instant::now();
        let reply = crate::peer::call(
            client,
            &target.host,
            &target.address,
            "POST",
            "/v1/peer/migrations",
            Some(&body),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !reply.is_success() {
            return Err(format!(
                "{} refused to prepare ({}): {}",
                target.host,
                reply.status,
                reply.reason()
            ));
        }
        let prepared: Prepared = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("{}'s answer to the offer: {e}", target.host))?;
        lock(&job.spans).0 = Some(offered.elapsed().as_millis() as u64);
        // An unspecified listening address: the host we reached.
        let mut data_plane: SocketAddr = prepared.address.parse().map_err(|_| {
            format!(
                "{} answered a bad address {:?}",
                target.host, prepared.address
            )
        })?;
        if data_plane.ip().is_unspecified() {
            if let Ok(a) = target.address.parse::<SocketAddr>() {
                data_plane.set_ip(a.ip());
            }
        }
        let transport = match self.data_plane_transport(&prepared, target) {
            Ok(t) => t,
            Err(e) => {
                lock(&job.view).destination_migration = Some(prepared.id.clone());
                self.abort_remote(client, job).await;
                return Err(e);
            }
        };
        {
            let mut v = lock(&job.view);
            v.destination_migration = Some(prepared.id.clone());
            v.data_plane = Some(data_plane.to_string());
            v.transport = if prepared.plaintext {
                PLAINTEXT.into()
            } else {
                mutual_tls(&target.host)
            };
        }
        let token_file = match self.write_source_token(&job.snapshot().id, &prepared.token) {
            Ok(f) => f,
            Err(e) => {
                self.abort_remote(client, job).await;
                return Err(e);
            }
        };
        let _token_gone = RemoveOnDrop(token_file.clone());
        // Written before the data plane starts: a restart of this agent
        // settles it (crate::jobs).
        self.save_job(job);
        if !job.hand_to_engine() {
            self.abort_remote(client, job).await;
            return Err("cancelled by the operator before the data plane started".into());
        }
        self.set_phase(job, JobPhase::Transferring, None);
        slot.departing.store(true, Ordering::SeqCst);
        let local_disk = record.definition.disk.as_ref().is_some_and(|d| d.local);
        // Retunes made while preparing are in the view (the hand-off lock
        // orders them before this read; later ones go to the VMM).
        let (downtime_ms, bandwidth) = {
            let mut v = lock(&job.view);
            if job.postcopy_asked.load(Ordering::SeqCst) {
                v.mode = "postcopy".into();
            }
            (
                v.downtime_target_ms.unwrap_or(record.policy.downtime_ms),
                v.bandwidth_cap,
            )
        };
        let mode = if job.postcopy_asked.load(Ordering::SeqCst) {
            Mode::Postcopy
        } else {
            mode
        };
        let request = Request::Migrate(MigrateRequest {
            to: data_plane.to_string(),
            downtime_ms,
            max_downtime_ms: req.max_downtime_ms,
            bandwidth,
            auto_converge: record.policy.allow_auto_converge,
            mode,
            // A copied disk moves by pre-copy only.
            allow_postcopy: record.policy.allow_postcopy && !local_disk,
            recovery_ms: None,
            streams: req.streams,
            priority: Default::default(),
            cpu_share: None,
            transport: Some(transport),
            token_file: Some(token_file),
            copy_storage: local_disk,
        });
        // The policy's completion timeout: the engine is cancelled the
        // same way an operator cancels it.
        let limit = Duration::from_millis(record.policy.completion_timeout_ms);
        let timer = {
            let job = job.clone();
            let socket = record.api_socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                job.timed_out.store(true, Ordering::SeqCst);
                if let Err(e) = supervisor::call(&socket, Request::CancelMigration).await {
                    tracing::warn!("completion timeout: cannot cancel: {e}");
                }
            })
        };
        let socket = record.api_socket.clone();
        let progress_job = job.clone();
        let answer = tokio::task::spawn_blocking(move || {
            ferry_control::client::call_with_progress(&socket, &request, |r| {
                if let Response::Progress(p) = r {
                    let mut v = lock(&progress_job.view);
                    v.progress = Some(JobProgress::from(p));
                    v.last_progress = Some(p.clone());
                    v.progress_lines += 1;
                    drop(v);
                    if let Some(past) = PastCancel::of(&p.phase) {
                        *lock(&progress_job.past_cancel) = Some(past);
                    }
                }
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        timer.abort();
        match answer {
            Ok(Response::Migrated(report)) => {
                lock(&job.spans).1 = Some(report.total_ms as u64);
                *lock(&job.past_cancel) = Some(PastCancel::Committed);
                lock(&job.view).report = Some(*report);
                self.confirm_commit(client, job).await;
                self.migrated_away(slot, record, target);
                Ok(())
            }
            Ok(Response::MigrationFailed {
                reason,
                vm_running,
                report,
                ..
            }) => {
                lock(&job.view).report = Some(*report);
                slot.departing.store(false, Ordering::SeqCst);
                self.abort_remote(client, job).await;
                if !vm_running {
                    self.source_lost(slot, record, &reason);
                }
                Err(reason)
            }
            Ok(Response::Error { message }) => {
                slot.departing.store(false, Ordering::SeqCst);
                self.abort_remote(client, job).await;
                Err(format!("the source VMM refused: {message}"))
            }
            Ok(other) => {
                slot.departing.store(false, Ordering::SeqCst);
                self.abort_remote(client, job).await;
                Err(format!("the source VMM answered {other:?}"))
            }
            Err(e) => {
                slot.departing.store(false, Ordering::SeqCst);
                self.abort_remote(client, job).await;
                let gone = lock(&slot.vmm).is_none();
                if gone {
                    self.source_lost(slot, record, &e);
                }
                Err(format!("talking to the source VMM: {e}"))
            }
        }
    }

    /// Writes the job under the state directory (once the destination
    /// has prepared it; before that there is nothing to settle).
    pub(crate) fn save_job(&self, job: &JobSlot) {
        if let Some(mut file) = crate::jobs::JobFile::of(&job.snapshot()) {
            file.measured = *lock(&job.measured);
            if let Err(e) = crate::jobs::save(&self.config.state_dir, &file) {
                tracing::error!("cannot write job {}: {e}", file.id);
            }
        }
    }

    /// How the source VMM secures its connections: mutual TLS to the
    /// target host, or plaintext only where both agents allow it.
    fn data_plane_transport(
        &self,
        prepared: &Prepared,
        target: &MigrationTarget,
    ) -> Result<ferry_control::TransportRequest, String> {
        if prepared.plaintext {
            if !self.config.insecure_plaintext_data_plane {
                return Err(format!(
                    "{} prepared a plaintext data plane, which this host ({}) does not allow",
                    target.host, self.config.host_name
                ));
            }
            return Ok(ferry_control::TransportRequest::InsecurePlaintext);
        }
        Ok(ferry_control::TransportRequest::Tls {
            dir: self.tls_dir().map_err(|e| e.to_string())?,
            peer_name: target.host.clone(),
        })
    }

    /// Writes the destination's session token for the source VMM (0600,
    /// under the state directory's jobs/).
    fn write_source_token(&self, job: &str, hex: &str) -> Result<PathBuf, String> {
        let token = SessionToken::from_hex(hex)
            .map_err(|e| format!("the destination's answer to the offer: {e}"))?;
        let dir = self.config.state_dir.join("jobs");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("{job}.token"));
        let _ = std::fs::remove_file(&path);
        token.write_file(&path).map_err(|e| e.to_string())?;
        Ok(path)
    }
}

/// Removes a file when dropped (a token file once its migration ended).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
