//! The commands a running VM's owner (`ferry run --api`, `ferry receive
//! --api`) accepts over its API socket, and its answers. One JSON object per
//! line; a migration answers with progress lines before its final answer.
//! The CLI and the agent both speak it, through [`client`].

pub mod client;
mod priority;

pub use priority::CpuPriority;

use std::path::PathBuf;

use ferry_migration::stats::{MigrationReport, Progress};
use ferry_vmm::snapshot::SnapshotReport;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// What is running here.
    Status,
    /// Pause, write a snapshot to `path`, then resume (or stop).
    Snapshot { path: PathBuf, stop: bool },
    /// Live-migrate the VM to a `ferry receive` at `to`.
    Migrate(MigrateRequest),
    /// Try again a post-copy that gave up after its link failed.
    ResumeMigration,
    /// Stop every vCPU and keep them stopped (the guest's clock runs on:
    /// its next heartbeat reports the pause as a stall).
    Pause,
    /// Run the vCPUs of a paused VM again.
    Resume,
    /// Abandon the migration under way before its commit: the VM runs on
    /// here. Answered at once by the API thread (the VM's owner is busy
    /// migrating): `CancelRequested` when the cancel was accepted (the
    /// engine stops at its next check, at the latest where its blackout
    /// would begin), `CancelRefused` when the engine had sealed first.
    CancelMigration,
    /// Retune the migration under way: answered at once by the API thread,
    /// like a cancel. The pacers follow a new bandwidth from their next
    /// batch; a downtime target or a switch to post-copy is taken between
    /// rounds. Post-copy is the caller's to allow (the VM's policy).
    TuneMigration(TuneRequest),
}

/// New settings for the migration under way; None leaves one as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneRequest {
    /// A new downtime target, milliseconds.
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    /// A new send-rate cap, bytes per second; 0: uncapped.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Switch to post-copy after the round under way.
    #[serde(default)]
    pub postcopy: bool,
}

/// What the guest's latest heartbeat said, as the VM's owner saw it on the
/// console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFacts {
    /// Heartbeats since boot, from 0.
    pub seq: u64,
    /// Pages that failed the guest's verification so far.
    pub err: u64,
    /// The stall the latest heartbeat reported, microseconds.
    pub stall_us: u64,
    /// The longest stall any heartbeat reported here, microseconds.
    pub max_stall_us: u64,
    /// Pages written and verified so far.
    pub wr: u64,
    pub ver: u64,
    /// Heartbeats whose sequence number did not follow the previous one.
    pub sequence_breaks: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// host:port of the destination.
    pub to: String,
    /// The blackout to aim for.
    pub downtime_ms: f64,
    /// A hard limit on the blackout: a migration that cannot keep it is
    /// abandoned, the VM running on the source.
    #[serde(default)]
    pub max_downtime_ms: Option<f64>,
    /// Send-rate cap, bytes per second.
    pub bandwidth: Option<u64>,
    /// Brake a guest that outruns the link.
    pub auto_converge: bool,
    /// precopy, postcopy, hybrid or auto.
    #[serde(default)]
    pub mode: ferry_migration::mode::Mode,
    /// Auto mode may choose post-copy (the VM's policy allows a migration
    /// that a crash of either host would lose). Without it auto mode stays
    /// with pre-copy.
    #[serde(default)]
    pub allow_postcopy: bool,
    /// How long a post-copy whose link failed keeps reconnecting before it
    /// gives up (and waits for a ResumeMigration); None: the default.
    #[serde(default)]
    pub recovery_ms: Option<u64>,
    /// Page-data streams for large rounds; None: as many as the host has
    /// cores the VM's vCPUs leave free (at least 1, at most 4).
    #[serde(default)]
    pub streams: Option<u16>,
    /// Who gets a core when the migration and the guest compete for one.
    #[serde(default)]
    pub priority: CpuPriority,
    /// The migration's guaranteed share of the CPU (percent of the time the
    /// vCPUs are parked while rounds run); None: 50 when the vCPUs leave
    /// no core free and the guest has priority, else 0.
    #[serde(default)]
    pub cpu_share: Option<u32>,
    /// How the connections to the destination are secured. None: the
    /// migration is refused (plaintext must be asked for).
    #[serde(default)]
    pub transport: Option<TransportRequest>,
    /// A file (mode 0600) holding the one-time session token the
    /// destination was prepared with (protocol v8): every connection opens
    /// with it. None: connections are not bound (a destination that needs
    /// a token refuses them).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Copy the VM's disk to the destination with its memory (a local
    /// disk): pre-copy only. Without it a disk must be on storage both
    /// hosts share.
    #[serde(default)]
    pub copy_storage: bool,
}

/// The security of a migration's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransportRequest {
    /// Mutual TLS 1.3 with the identity in `dir` (ca.crt, cert.pem,
    /// key.pem), to a destination whose certificate is for `peer_name`.
    Tls {
        dir: std::path::PathBuf,
        peer_name: String,
    },
    /// Plain TCP, asked for explicitly (`--insecure-plaintext`).
    InsecurePlaintext,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        vcpus: u32,
        mem_bytes: u64,
        uptime_ms: f64,
        /// True while a Pause holds the vCPUs.
        #[serde(default)]
        paused: bool,
        /// The guest's latest heartbeat; None before the first.
        #[serde(default)]
        guest: Option<GuestFacts>,
    },
    /// Every vCPU has stopped.
    Paused {
        pause_ms: f64,
    },
    /// The vCPUs run again.
    Resumed,
    Snapshot(SnapshotReport),
    /// Not final: a migration is under way.
    Progress(Progress),
    /// The VM now runs on the destination; this one is stopped.
    Migrated(Box<MigrationReport>),
    /// The migration failed; `vm_running` says whether the VM runs here.
    MigrationFailed {
        reason: String,
        vm_running: bool,
        /// A post-copy that gave up on its link: ResumeMigration tries again.
        #[serde(default)]
        resumable: bool,
        report: Box<MigrationReport>,
    },
    /// A cancel was accepted (or, with `migrating` false, no migration
    /// was under way): the engine stops before its blackout and the VM
    /// runs on here; the migration's own answer says so.
    CancelRequested {
        /// False when no migration was under way.
        migrating: bool,
    },
    /// Too late for a cancel: the engine had passed its point of no
    /// return first, and the migration goes on to its commit.
    CancelRefused {
        sealed: ferry_migration::cancel::Sealed,
        reason: String,
    },
    /// A retune was passed on to the migration under way.
    TuneRequested {
        /// False when no migration was under way (nothing changed).
        migrating: bool,
    },
    Error {
        message: String,
    },
}

impl Response {
    /// True for the last line a request gets.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Progress(_))
    }
}
