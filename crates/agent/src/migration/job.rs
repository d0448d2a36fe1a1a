//! An outgoing migration as a job: what an operator asks for, and what
//! they see of it while it runs and after it has ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ferry_migration::stats::{MigrationReport, Progress};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::cancel::PastCancel;
use crate::api::ApiError;
use crate::events::Caller;
use crate::server::{lock, Agent};

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
    /// The blackout the engine aims for, as asked at the start or by the
    /// latest `PATCH`; None: not known (ferryd restarted meanwhile).
    #[serde(default)]
    pub downtime_target_ms: Option<f64>,
    /// The send-rate cap in bytes per second, as asked at the start or by
    /// the latest `PATCH`; None: uncapped (or not known after a restart).
    #[serde(default)]
    pub bandwidth_cap: Option<u64>,
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
    /// For a job that did not commit after the destination had prepared:
    /// whether the destination was told to release what it prepared
    /// (false: it could not be reached, and releases by itself later).
    #[serde(default)]
    pub destination_told: Option<bool>,
    /// What the abort call to the destination came to.
    #[serde(default)]
    pub destination_note: Option<String>,
    /// Who asked for it (as the audit log says).
    pub requested_by: Caller,
    pub started_at: String,
    pub ended_at: Option<String>,
}

/// Who holds the decision about a cancel: the agent until it hands the
/// migration to the source VMM, then the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// Still preparing: a cancel here stops the job before the data
    /// plane, and a retune is kept for the engine's start.
    Agent,
    /// Cancelled before the hand-off: the data plane never starts.
    Cancelled,
    /// `Request::Migrate` is on its way or running: only the engine's
    /// cancel state decides.
    Engine,
}

/// A job and what its cancel sets.
pub struct JobSlot {
    pub view: Mutex<MigrationJob>,
    /// Set once a cancel was accepted (by the agent or the engine).
    pub(super) cancel: AtomicBool,
    pub(crate) handoff: Mutex<Handoff>,
    /// A switch to post-copy asked for before the hand-off (set under the
    /// hand-off lock): the engine starts in post-copy.
    pub(crate) postcopy_asked: AtomicBool,
    /// Set when the policy's completion timeout ended it.
    pub(super) timed_out: AtomicBool,
    /// Set once the engine has gone past the point a cancel holds.
    pub(super) past_cancel: Mutex<Option<PastCancel>>,
    /// When the job started here (for what sending cost: SendMeasured).
    pub(super) started: std::time::Instant,
    /// The offer call's and the engine's spans, once known.
    pub(super) spans: Mutex<(Option<u64>, Option<u64>)>,
    /// Set for a committed job: written with its file.
    pub(crate) measured: Mutex<Option<crate::jobs::SendMeasured>>,
}

impl JobSlot {
    /// A job read back from the state directory after a restart.
    pub(crate) fn restored(view: MigrationJob) -> Self {
        Self::new(view)
    }

    pub(super) fn new(view: MigrationJob) -> Self {
        Self {
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            handoff: Mutex::new(Handoff::Agent),
            postcopy_asked: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            past_cancel: Mutex::new(None),
            started: std::time::Instant::now(),
            spans: Mutex::new((None, None)),
            measured: Mutex::new(None),
        }
    }

    pub(super) fn snapshot(&self) -> MigrationJob {
        lock(&self.view).clone()
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Hands the decision about cancels to the engine; false if a cancel
    /// came first (the data plane must not start).
    pub(super) fn hand_to_engine(&self) -> bool {
        let mut h = lock(&self.handoff);
        match *h {
            Handoff::Agent => {
                *h = Handoff::Engine;
                true
            }
            Handoff::Cancelled => false,
            Handoff::Engine => true,
        }
    }
}

impl Agent {
    pub fn job(&self, id: &str) -> Result<MigrationJob, ApiError> {
        lock(&self.jobs)
            .get(id)
            .map(|j| j.snapshot())
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))
    }
}
