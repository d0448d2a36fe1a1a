//! Migrations between agents, as jobs.
//!
//! # Sequence
//! ```text
//! operator          source agent                 destination agent         receiver VMM
//!   POST /v1/vms/X/migrations
//!   <- 202 job          take X's op lock
//!                       POST /v1/peer/migrations (mTLS, offer) ->
//!                                                 reserve in the ledger (503: nothing starts)
//!                                                 spawn `ferry receive` ---> listens
//!                       <- 201 {address, token}   watch its log and exit
//!                       Request::Migrate to X's VMM, progress recorded
//!                       source VMM ==========================================> data plane
//!                                                 "VM received" in its log:
//!                                                 adopt it as a record
//!                       <- Migrated; GET /v1/peer/migrations/ID until committed
//!                       remove X's record
//! ```
//! On any failure or cancel before the commit the source VM runs on and
//! the source agent calls `DELETE /v1/peer/migrations/ID`: the receiver is
//! stopped and the reservation released. A destination left without news
//! (the source agent died) releases it when the policy's completion
//! timeout plus a grace has passed without a commit.
//!
//! The destination learns the outcome from its own receiver (its log
//! says when the VM was received and runs there; its exit says it did
//! not), not from the source: the receiver is where the truth is, and it
//! holds even when the source agent dies right after the commit.

use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_control::{MigrateRequest, Request, Response};
use ferry_migration::mode::Mode;
use ferry_migration::stats::{MigrationReport, Progress};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::ApiError;
use crate::events::{AuditEntry, Caller, Event};
use crate::incoming::{IncomingFile, ReceiverProcess};
use crate::ledger::{Holder, Reservation};
use crate::model::{CreateVm, HostTap, MigrationPolicy, VmDefinition, VmRecord, VmState};
use crate::server::{lock, Agent, Slot, TapGuard};
use crate::supervisor::{self, ReceiverSecurity, Vmm};
use crate::time::now_rfc3339;
use ferry_migration::transport::SessionToken;

/// How long a receiver may take to print its listening address.
const RECEIVER_START: Duration = Duration::from_secs(30);
/// Beyond the policy's completion timeout, how long a prepared incoming
/// migration waits for its commit before it is released.
const INCOMING_GRACE: Duration = Duration::from_secs(30);
/// How long the source waits for the destination to report the commit
/// after its VMM said the VM moved.
const COMMIT_CONFIRM: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a migrated VM's tap may wait for its old VMM to exit (it
/// forwards stray frames until then) before it is removed anyway.
const TAP_OUTLIVES: Duration = Duration::from_secs(60);
/// The line `ferry receive` prints once its address is bound.
const LISTENING: &str = "ferry: listening on ";
/// The line `ferry receive` prints once the VM runs there.
pub(crate) const RECEIVED: &str = "ferry: VM received from ";

/// What the report's `transport` says of a plaintext data plane.
pub const PLAINTEXT: &str = "plaintext data plane (insecure_plaintext_data_plane = true on both agents; the control plane was mutual TLS 1.3)";

/// What a job's `transport` says of a data plane over mutual TLS to `peer`.
pub fn mutual_tls(peer: &str) -> String {
    format!("mutual TLS (TLS 1.3, peer {peer}), every connection bound to this migration by a one-time token")
}

/// The image a VM's local disk is copied into, in its directory here.
const COPIED_DISK: &str = "disk.img";
/// The file name of a prepared migration's session token, next to the
/// receiver's console log.
pub(crate) const TOKEN_FILE: &str = "session.token";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationTarget {
    /// The destination host's name: its agent's certificate must be this
    /// host's.
    pub host: String,
    /// host:port of the destination agent's peer listener.
    pub address: String,
}

/// `POST /v1/vms/{id}/migrations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    pub target: MigrationTarget,
    /// precopy, postcopy, hybrid or auto (default: precopy; post-copy
    /// modes only where the VM's policy allows them).
    #[serde(default)]
    pub mode: Option<String>,
    /// The blackout to aim for; default: the policy's.
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// Abandon the migration rather than exceed this blackout.
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    /// Send-rate cap in bytes per second; default: the policy's.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Page-data streams; default: the engine's choice.
    #[serde(default)]
    pub streams: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Asking the destination to reserve and start its receiver.
    Preparing,
    /// The data plane runs.
    Transferring,
    /// The VM runs on the destination.
    Committed,
    /// The VM runs on the source (unless `error` says otherwise).
    Failed,
    /// Cancelled by the operator; the VM runs on the source.
    Cancelled,
}

impl JobPhase {
    pub fn is_done(self) -> bool {
        matches!(self, Self::Committed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Transferring => "transferring",
            Self::Committed => "committed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The engine's latest progress line, in the units an operator reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobProgress {
    /// The engine's phase: setup, round, blackout, committed.
    pub phase: String,
    pub round: u32,
    /// MiB still to send in this round.
    pub mib_left: f64,
    pub sent_mib: f64,
    pub dirty_rate_mibs: f64,
    pub throughput_mibs: f64,
    pub throttle_percent: u32,
    /// The blackout if the VM stopped now: what is left of this round at
    /// the current rate.
    pub predicted_downtime_ms: Option<f64>,
    /// Time left in this round at the current rate.
    pub eta_ms: Option<f64>,
    pub elapsed_ms: f64,
    pub message: Option<String>,
}

impl From<&Progress> for JobProgress {
    fn from(p: &Progress) -> Self {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let predicted =
            (p.throughput_mibs > 0.0).then(|| mib(p.remaining_bytes) / p.throughput_mibs * 1e3);
        Self {
            phase: p.phase.clone(),
            round: p.round,
            mib_left: mib(p.remaining_bytes),
            sent_mib: mib(p.sent_bytes),
            dirty_rate_mibs: p.dirty_rate_mibs,
            throughput_mibs: p.throughput_mibs,
            throttle_percent: p.throttle_percent,
            predicted_downtime_ms: predicted,
            eta_ms: p.eta_ms,
            elapsed_ms: p.elapsed_ms,
            message: p.message.clone(),
        }
    }
}

/// `GET /v1/migrations/{id}`: a migration job of this (source) host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationJob {
    pub id: String,
    pub vm: String,
    /// This host.
    pub source: String,
    pub target: MigrationTarget,
    pub phase: JobPhase,
    /// How guest memory crosses the network.
    pub transport: String,
    pub mode: String,
    /// The destination's id of its incoming migration.
    pub destination_migration: Option<String>,
    /// The receiving VMM's address.
    pub data_plane: Option<String>,
    pub progress: Option<JobProgress>,
    /// The engine's latest progress line as it sent it.
    #[schema(value_type = Option<Object>)]
    pub last_progress: Option<Progress>,
    /// Progress lines received from the source VMM.
    pub progress_lines: u64,
    /// The engine's report (crates/migration's `MigrationReport`), once
    /// the data plane has ended.
    #[schema(value_type = Option<Object>)]
    pub report: Option<MigrationReport>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Who asked for it (as the audit log says).
    pub requested_by: Caller,
    pub started_at: String,
    pub ended_at: Option<String>,
}

/// A job and what its cancel sets.
pub struct JobSlot {
    pub view: Mutex<MigrationJob>,
    cancel: AtomicBool,
    /// Set when the policy's completion timeout ended it.
    timed_out: AtomicBool,
}

impl JobSlot {
    /// A job read back from the state directory after a restart.
    pub(crate) fn restored(view: MigrationJob) -> Self {
        Self {
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
        }
    }

    fn snapshot(&self) -> MigrationJob {
        lock(&self.view).clone()
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// `POST /v1/peer/migrations`: what a source offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerOffer {
    /// The source's job id.
    pub job: String,
    /// The VM's id, kept on the destination.
    pub vm: String,
    pub definition: VmDefinition,
    pub policy: MigrationPolicy,
    /// The source's agent allows a plaintext data plane.
    pub plaintext_data_plane: bool,
}

/// The destination's answer to an offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prepared {
    /// The destination's id of this incoming migration.
    pub id: String,
    /// Where the source's VMM connects.
    pub address: String,
    /// One-time token bound to this migration (32 random bytes, hex): the
    /// source's VMM opens every connection with it.
    pub token: String,
    pub transport: String,
    /// The data plane is in the clear (both agents allow it); otherwise
    /// mutual TLS 1.3 with the two hosts' certificates.
    #[serde(default)]
    pub plaintext: bool,
    /// The reservation is released if the VM has not arrived by then.
    pub expires_in_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncomingPhase {
    /// Reserved; the receiver listens.
    Ready,
    /// The VM runs here and has a record.
    Committed,
    /// The source gave up (failure or cancel); released.
    Aborted,
    /// Not used in time; released.
    Expired,
    /// The receiver ended without the VM; released.
    Failed,
}

/// `GET /v1/peer/migrations/{id}`: an incoming migration of this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingView {
    pub id: String,
    pub vm: String,
    pub job: String,
    /// The host whose certificate prepared it (none: a local operator).
    pub source: Option<String>,
    pub phase: IncomingPhase,
    pub address: String,
    pub mem_bytes: u64,
    pub reason: Option<String>,
    pub created_at: String,
}

pub struct IncomingSlot {
    pub(crate) view: Mutex<IncomingView>,
    /// Only this host (or an operator) may see or abort it.
    source: Option<String>,
    abort: AtomicBool,
    wake: tokio::sync::Notify,
}

impl IncomingSlot {
    /// A slot showing `view` (prepared now, or read back after a restart).
    pub(crate) fn new(view: IncomingView) -> Arc<Self> {
        Arc::new(Self {
            source: view.source.clone(),
            view: Mutex::new(view),
            abort: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }
}

fn reservation(def: &VmDefinition, holder: Holder) -> Reservation {
    Reservation {
        mem_bytes: def.mem_bytes,
        vcpus: def.vcpus,
        holder,
    }
}

fn host_of(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Peer { role, name, .. } if role == "host" => Some(name),
        _ => None,
    }
}

/// The incoming migration's source, or an operator, may touch it.
fn may_touch(inc: &IncomingSlot, caller: &Caller) -> bool {
    match host_of(caller) {
        Some(host) => inc
            .source
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case(host)),
        None => true,
    }
}

/// Bytes appended to `path` past `*offset`, as text.
pub(crate) fn read_new(path: &Path, offset: &mut u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(4 << 20).read_to_end(&mut buf);
    // Only whole lines: a line being written is read next time.
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    *offset += end as u64;
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

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

    /// This host's identity directory, as the VMMs it starts must read it.
    fn tls_dir(&self) -> Result<PathBuf, ApiError> {
        let dir = self.config.tls_dir.as_ref().ok_or_else(|| {
            ApiError::Incompatible(
                "this host has no tls_dir in its config: its data plane cannot be mutual TLS"
                    .into(),
            )
        })?;
        Ok(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()))
    }

    pub fn job(&self, id: &str) -> Result<MigrationJob, ApiError> {
        lock(&self.jobs)
            .get(id)
            .map(|j| j.snapshot())
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))
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
            destination_migration: None,
            data_plane: None,
            progress: None,
            last_progress: None,
            progress_lines: 0,
            report: None,
            error: None,
            requested_by: caller.clone(),
            started_at: now_rfc3339(),
            ended_at: None,
        };
        let job = Arc::new(JobSlot {
            view: Mutex::new(view.clone()),
            cancel: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
        });
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

    fn set_phase(&self, job: &JobSlot, phase: JobPhase, reason: Option<String>) {
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
        // After a commit the old VMM's exit stays no failure: it may come
        // after the VM has come back here under the same id.
        if phase != JobPhase::Committed {
            slot.departing.store(false, Ordering::SeqCst);
        }
        *lock(&slot.job) = None;
        self.set_phase(&job, phase, reason.clone());
        self.save_job(&job);
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

    /// Tells the destination to drop what it prepared (best effort: it
    /// releases it by itself after its timeout anyway).
    async fn abort_remote(&self, client: &Arc<rustls::ClientConfig>, job: &JobSlot) {
        let (target, dest) = {
            let v = lock(&job.view);
            (v.target.clone(), v.destination_migration.clone())
        };
        let Some(dest) = dest else { return };
        let path = format!("/v1/peer/migrations/{dest}");
        match crate::peer::call(client, &target.host, &target.address, "DELETE", &path, None).await
        {
            Ok(r) if r.is_success() => {}
            Ok(r) => tracing::warn!(
                "aborting {dest} on {}: {} {}",
                target.host,
                r.status,
                r.reason()
            ),
            Err(e) => tracing::warn!("aborting {dest} on {}: {e}", target.host),
        }
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
        if job.cancelled() {
            self.abort_remote(client, job).await;
            return Err("cancelled by the operator before the data plane started".into());
        }
        self.set_phase(job, JobPhase::Transferring, None);
        slot.departing.store(true, Ordering::SeqCst);
        let local_disk = record.definition.disk.as_ref().is_some_and(|d| d.local);
        let request = Request::Migrate(MigrateRequest {
            to: data_plane.to_string(),
            downtime_ms: req.downtime_ms.unwrap_or(record.policy.downtime_ms),
            max_downtime_ms: req.max_downtime_ms,
            bandwidth: req.bandwidth.or(record.policy.bandwidth),
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
                }
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        timer.abort();
        match answer {
            Ok(Response::Migrated(report)) => {
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
    fn save_job(&self, job: &JobSlot) {
        if let Some(file) = crate::jobs::JobFile::of(&job.snapshot()) {
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

    /// The source VMM ended (or cannot run the VM) during a migration
    /// that did not commit: the record says so.
    fn source_lost(&self, slot: &Slot, record: &VmRecord, why: &str) {
        let mut r = record.clone();
        if lock(&slot.vmm).is_none() {
            lock(&self.ledger).release(&r.id);
        }
        self.set_state(
            &mut r,
            VmState::Failed,
            Some(format!(
                "a migration failed and the VM does not run here: {why}; last words: {}",
                supervisor::last_words(&record.log)
            )),
        );
    }

    /// Waits (bounded) until the destination says the VM runs there.
    async fn confirm_commit(&self, client: &Arc<rustls::ClientConfig>, job: &JobSlot) {
        let (target, dest) = {
            let v = lock(&job.view);
            (v.target.clone(), v.destination_migration.clone())
        };
        let Some(dest) = dest else { return };
        let path = format!("/v1/peer/migrations/{dest}");
        let deadline = Instant::now() + COMMIT_CONFIRM;
        while Instant::now() < deadline {
            if let Ok(r) =
                crate::peer::call(client, &target.host, &target.address, "GET", &path, None).await
            {
                if let Ok(v) = serde_json::from_slice::<IncomingView>(&r.body) {
                    if v.phase != IncomingPhase::Ready {
                        if v.phase != IncomingPhase::Committed {
                            tracing::error!(
                                "{dest} on {}: the source VMM reported the commit, but the destination says {:?}: {}",
                                target.host,
                                v.phase,
                                v.reason.unwrap_or_default()
                            );
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::error!(
            "{dest} on {}: the destination did not confirm the commit within {COMMIT_CONFIRM:?}",
            target.host
        );
    }

    /// The VM runs on the destination now: its record here goes, its VMM
    /// exits by itself (and that exit is no failure).
    pub(crate) fn migrated_away(&self, slot: &Slot, record: &VmRecord, target: &MigrationTarget) {
        if let Err(e) = self.store.remove(&record.id) {
            tracing::error!("cannot remove the record of VM {}: {e}", record.id);
        }
        lock(&self.ledger).release(&record.id);
        lock(&self.slots).remove(&record.id);
        if let Some(tap) = record.tap.clone() {
            // The old VMM forwards stray frames from its tap to the new
            // host until it exits: the tap goes after it.
            let exited = lock(&slot.vmm).clone().map(|(_, rx)| rx);
            let vm = record.id.clone();
            tokio::spawn(async move {
                if let Some(mut rx) = exited {
                    let _ = tokio::time::timeout(TAP_OUTLIVES, rx.wait_for(Option::is_some)).await;
                }
                crate::network::remove_tap_logged(&tap, &vm);
            });
        }
        if let Some(dir) = record.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.events.publish(Event::VmMigrated {
            time: now_rfc3339(),
            vm: record.id.clone(),
            to: target.host.clone(),
        });
    }

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

    // ---- the destination's side ----

    pub fn incoming(&self, caller: &Caller, id: &str) -> Result<IncomingView, ApiError> {
        let inc = lock(&self.incoming)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        if !may_touch(&inc, caller) {
            return Err(ApiError::Forbidden(format!(
                "incoming migration {id} was prepared by another host"
            )));
        }
        let v = lock(&inc.view).clone();
        Ok(v)
    }

    /// `DELETE /v1/peer/migrations/{id}`: the source gave up.
    pub fn abort_incoming(&self, caller: &Caller, id: &str) -> Result<IncomingView, ApiError> {
        let inc = lock(&self.incoming)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        if !may_touch(&inc, caller) {
            return Err(ApiError::Forbidden(format!(
                "incoming migration {id} was prepared by another host"
            )));
        }
        let v = lock(&inc.view).clone();
        if v.phase == IncomingPhase::Committed {
            return Err(ApiError::Conflict(format!(
                "incoming migration {id} has committed: VM {} runs here",
                v.vm
            )));
        }
        inc.abort.store(true, Ordering::SeqCst);
        inc.wake.notify_one();
        Ok(v)
    }

    /// `POST /v1/peer/migrations`: judge, reserve, start the receiver.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        caller: &Caller,
        offer: PeerOffer,
    ) -> Result<Prepared, ApiError> {
        Self::validate(&CreateVm {
            id: Some(offer.vm.clone()),
            definition: offer.definition.clone(),
            policy: offer.policy.clone(),
        })?;
        // A local disk arrives in a new image in the VM's directory here;
        // a shared one must be visible here at the same path.
        let mut offer = offer;
        if let Some(disk) = offer.definition.disk.as_mut().filter(|d| d.local) {
            disk.path = self
                .config
                .state_dir
                .join("vms")
                .join(&offer.vm)
                .join(COPIED_DISK);
        }
        // Refused before anything is reserved: the VM stays on the source.
        if !offer.definition.disk.as_ref().is_some_and(|d| d.local) {
            self.sees_disk(&offer.vm, &offer.definition)?;
        }
        let network = match &offer.definition.net {
            Some(net) => {
                if net.mac.is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "VM {}'s card has no MAC in the offer: the source records one at creation",
                        offer.vm
                    )));
                }
                let Some(network) = self.config.network(&net.network) else {
                    return Err(ApiError::Incompatible(format!(
                        "VM {} needs network {:?}, which host {} does not have (it has: {})",
                        offer.vm,
                        net.network,
                        self.config.host_name,
                        self.config.network_names()
                    )));
                };
                Some(network.clone())
            }
            None => None,
        };
        // Plaintext only when both agents say so; otherwise mutual TLS with
        // the certificate that prepared it as the only source allowed.
        let plaintext = offer.plaintext_data_plane && self.config.insecure_plaintext_data_plane;
        let source = host_of(caller).map(str::to_owned);
        let security = if plaintext {
            ReceiverSecurity::Plaintext
        } else {
            let Some(host) = source.clone() else {
                return Err(ApiError::Incompatible(
                    "a mutual-TLS data plane takes only the source host that prepares it: prepare from the source agent's peer connection (a host certificate), or allow a plaintext data plane on both agents".into(),
                ));
            };
            ReceiverSecurity::MutualTls {
                dir: self.tls_dir()?,
                source: host,
            }
        };
        let token = SessionToken::generate().map_err(|e| ApiError::internal(e.to_string()))?;
        let vm = offer.vm.clone();
        let id = format!("in-{:08x}", rand::random::<u32>());
        {
            let slots = lock(&self.slots);
            if slots.contains_key(&vm) {
                return Err(ApiError::Conflict(format!(
                    "a VM {vm} exists on this host already"
                )));
            }
            if let Some(other) = self.incoming_vm(&vm) {
                return Err(ApiError::Conflict(format!(
                    "VM {vm} is already coming here ({other})"
                )));
            }
            // Checked and reserved under the slots' lock: two offers
            // cannot both pass.
            lock(&self.ledger).reserve(&vm, reservation(&offer.definition, Holder::Incoming))?;
        }
        // The VM's tap, attached to its bridge before any page moves.
        let tap = match &network {
            Some(n) => match crate::network::create_tap(n) {
                Ok(t) => Some(TapGuard::new(t, &vm)),
                Err(e) => {
                    lock(&self.ledger).release(&vm);
                    return Err(ApiError::Incompatible(e.to_string()));
                }
            },
            None => None,
        };
        let net_flag = tap.as_ref().map(|t| crate::network::receive_flag(&t.tap));
        let dir = self.vm_dir(&vm);
        let released = |agent: &Self, e: ApiError| {
            lock(&agent.ledger).release(&vm);
            let _ = std::fs::remove_dir_all(&dir);
            crate::incoming::forget(&agent.config.state_dir, &id);
            e
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(released(
                self,
                ApiError::internal(format!("cannot create {}: {e}", dir.display())),
            ));
        }
        let socket = dir.join("api.sock");
        let log = dir.join("console.log");
        let token_file = dir.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&token_file);
        if let Err(e) = token.write_file(&token_file) {
            return Err(released(self, ApiError::internal(e.to_string())));
        }
        // Written before the receiver starts and again at each step, so
        // that a restarted agent finds its receiver (crate::incoming).
        let mut file = IncomingFile {
            view: IncomingView {
                id: id.clone(),
                vm: vm.clone(),
                job: offer.job.clone(),
                source: source.clone(),
                phase: IncomingPhase::Ready,
                address: String::new(),
                mem_bytes: offer.definition.mem_bytes,
                reason: None,
                created_at: now_rfc3339(),
            },
            offer,
            receiver: None,
            tap: tap.as_ref().map(|t| t.tap.clone()),
            answered: false,
            log_offset: 0,
            expires_at_ms: 0,
        };
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            return Err(released(self, ApiError::internal(e)));
        }
        let ip = self
            .config
            .peer_listen
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip());
        let mut vmm = match Vmm::spawn_receiver(
            &self.config.ferry_bin,
            &file.offer.definition,
            net_flag.as_deref(),
            ip,
            &socket,
            &log,
            &security,
            &token_file,
        ) {
            Ok(v) => v,
            Err(e) => return Err(released(self, ApiError::Vmm(e.to_string()))),
        };
        file.receiver = Some(ReceiverProcess {
            pid: vmm.pid,
            start_time: vmm.start_time,
        });
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            kill(vmm).await;
            return Err(released(self, ApiError::internal(e)));
        }
        // Its address, from its log.
        let started = Instant::now();
        let mut offset = 0;
        let address = loop {
            let text = read_new(&log, &mut offset);
            if let Some(a) = text
                .lines()
                .find_map(|l| l.strip_prefix(LISTENING))
                .map(|a| a.trim().to_owned())
            {
                break a;
            }
            if vmm.has_exited() || started.elapsed() > RECEIVER_START {
                let exit = kill(vmm).await;
                return Err(released(
                    self,
                    ApiError::Vmm(format!(
                        "the receiving VMM did not come up ({}): {}",
                        exit.description,
                        supervisor::last_words(&log)
                    )),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token = token.to_hex();
        let expires =
            Duration::from_millis(file.offer.policy.completion_timeout_ms) + INCOMING_GRACE;
        file.view.address = address.clone();
        file.answered = true;
        file.log_offset = offset;
        file.expires_at_ms = crate::incoming::unix_ms_now() + expires.as_millis() as u64;
        if let Err(e) = crate::incoming::save(&self.config.state_dir, &file) {
            kill(vmm).await;
            return Err(released(self, ApiError::internal(e)));
        }
        let inc = IncomingSlot::new(file.view.clone());
        lock(&self.incoming).insert(id.clone(), inc.clone());
        tracing::info!(
            "incoming migration {id}: VM {vm} from {}, receiver pid {} on {address}",
            inc.source.as_deref().unwrap_or("a local operator"),
            vmm.pid
        );
        let agent = self.clone();
        let deadline = Instant::now() + expires;
        tokio::spawn(async move {
            agent.watch_incoming(inc, vmm, tap, file, deadline).await;
        });
        Ok(Prepared {
            id,
            address,
            token,
            transport: match &security {
                ReceiverSecurity::Plaintext => PLAINTEXT.into(),
                ReceiverSecurity::MutualTls { source, .. } => mutual_tls(source),
            },
            plaintext,
            expires_in_ms: expires.as_millis() as u64,
        })
    }

    /// This host's directory of VM `vm` (its log, API socket, disk copy).
    pub(crate) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(vm)
    }

    /// Follows a prepared receiver until the VM has arrived (then adopts
    /// it), the receiver ends, the source aborts or the time is up; each
    /// outcome is written to `file`. The tap (if the VM has a card) is
    /// removed with the rest unless the VM arrives.
    pub(crate) async fn watch_incoming(
        self: Arc<Self>,
        inc: Arc<IncomingSlot>,
        mut vmm: Vmm,
        mut tap: Option<TapGuard>,
        mut file: IncomingFile,
        deadline: Instant,
    ) {
        let dir = self.vm_dir(&file.view.vm);
        let (socket, log) = (dir.join("api.sock"), dir.join("console.log"));
        let mut offset = file.log_offset;
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(50), inc.wake.notified()).await;
            if read_new(&log, &mut offset).contains(RECEIVED) {
                let tap = tap.as_mut().map(|t| {
                    t.disarm();
                    t.tap.clone()
                });
                self.adopt_incoming(&inc, &mut file, Ok(vmm), tap, socket, log);
                return;
            }
            let aborted = inc.abort.load(Ordering::SeqCst);
            let expired = Instant::now() >= deadline;
            if aborted || expired {
                stop(vmm).await;
                if aborted {
                    self.end_incoming(
                        &inc,
                        &mut file,
                        IncomingPhase::Aborted,
                        "the source aborted it".into(),
                    );
                } else {
                    self.end_incoming(
                        &inc,
                        &mut file,
                        IncomingPhase::Expired,
                        "the VM did not arrive in time; released".into(),
                    );
                }
                return;
            }
            if vmm.has_exited() {
                let exit = vmm.wait().await;
                let words = supervisor::last_words(&log);
                self.end_incoming(
                    &inc,
                    &mut file,
                    IncomingPhase::Failed,
                    format!("the receiver {} without the VM: {words}", exit.description),
                );
                return;
            }
        }
    }

    /// An incoming migration ended without the VM: its reservation and
    /// directory go (its tap goes with the caller's guard), and the
    /// outcome is shown and written down.
    pub(crate) fn end_incoming(
        &self,
        inc: &IncomingSlot,
        file: &mut IncomingFile,
        phase: IncomingPhase,
        reason: String,
    ) {
        lock(&self.ledger).release(&file.view.vm);
        let _ = std::fs::remove_dir_all(self.vm_dir(&file.view.vm));
        let mut v = lock(&inc.view);
        tracing::info!("incoming migration {}: {phase:?}: {reason}", v.id);
        v.phase = phase;
        v.reason = Some(reason);
        file.view = v.clone();
        drop(v);
        if let Err(e) = crate::incoming::save(&self.config.state_dir, file) {
            tracing::error!("cannot write incoming migration {}: {e}", file.view.id);
        }
    }

    /// The VM runs here: it gets its record and reservation. `vmm`: its
    /// receiver, supervised from now on, or why it is gone (it ended while
    /// no agent watched it, after the VM had arrived: the record says the
    /// VM failed here).
    pub(crate) fn adopt_incoming(
        self: &Arc<Self>,
        inc: &IncomingSlot,
        file: &mut IncomingFile,
        vmm: Result<Vmm, String>,
        tap: Option<HostTap>,
        api_socket: PathBuf,
        log: PathBuf,
    ) {
        // The token has done its one job.
        if let Some(dir) = log.parent() {
            let _ = std::fs::remove_file(dir.join(TOKEN_FILE));
        }
        let offer = &file.offer;
        let (pid, pid_start_time) = match &vmm {
            Ok(v) => (Some(v.pid), Some(v.start_time)),
            Err(_) => (None, None),
        };
        let mut record = VmRecord {
            id: offer.vm.clone(),
            definition: offer.definition.clone(),
            policy: offer.policy.clone(),
            state: VmState::Running,
            reason: None,
            pid,
            pid_start_time,
            api_socket,
            log,
            created_at: now_rfc3339(),
            tap,
        };
        let slot = Slot::new();
        {
            let mut slots = lock(&self.slots);
            match &vmm {
                Ok(_) => lock(&self.ledger)
                    .force(&record.id, reservation(&record.definition, Holder::Vm)),
                Err(_) => lock(&self.ledger).release(&record.id),
            }
            if let Err(e) = self.store.insert_new(&record) {
                tracing::error!("cannot store the received VM {}: {e}", record.id);
            }
            slots.insert(record.id.clone(), slot.clone());
        }
        let from = inc
            .source
            .clone()
            .unwrap_or_else(|| "a local operator".into());
        match vmm {
            Ok(vmm) => {
                self.watch_vmm(&record.id, &slot, vmm);
                self.set_state(
                    &mut record,
                    VmState::Running,
                    Some(format!("migrated in from {from}")),
                );
            }
            Err(why) => self.set_state(
                &mut record,
                VmState::Failed,
                Some(format!("migrated in from {from}, then {why}")),
            ),
        }
        let mut v = lock(&inc.view);
        v.phase = IncomingPhase::Committed;
        v.reason = None;
        tracing::info!("incoming migration {}: VM {} runs here", v.id, record.id);
        file.view = v.clone();
        drop(v);
        if let Err(e) = crate::incoming::save(&self.config.state_dir, file) {
            tracing::error!("cannot write incoming migration {}: {e}", file.view.id);
        }
    }

    /// The incoming migration, not yet ended, that brings `vm` here.
    pub(crate) fn incoming_vm(&self, vm: &str) -> Option<String> {
        lock(&self.incoming).values().find_map(|i| {
            let v = lock(&i.view);
            (v.vm == vm && v.phase == IncomingPhase::Ready).then(|| v.id.clone())
        })
    }

    /// Memory reserved now by incoming migrations.
    pub fn incoming_reserved(&self) -> u64 {
        lock(&self.ledger).held_by(Holder::Incoming)
    }
}

/// SIGKILL, and the exit it caused.
async fn kill(vmm: Vmm) -> supervisor::Exit {
    let _ = vmm.handle().signal(Signal::KILL);
    vmm.wait().await
}

/// SIGTERM, then SIGKILL after a grace.
pub(crate) async fn stop(vmm: Vmm) {
    let handle = vmm.handle();
    let _ = handle.signal(Signal::TERM);
    let mut waiting = tokio::spawn(vmm.wait());
    if tokio::time::timeout(STOP_GRACE, &mut waiting)
        .await
        .is_err()
    {
        let _ = handle.signal(Signal::KILL);
        let _ = waiting.await;
    }
}

/// Removes a file when dropped (a token file once its migration ended).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
