//! What the agent keeps about a VM (its record) and what the API accepts
//! and answers.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the VM is: `ferry run`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    /// Guest memory in bytes, a multiple of 2 MiB.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// `idle` or `dirty:WS_MB:RATE[:FILL_MB]`.
    #[serde(default = "idle")]
    pub workload: String,
    /// A guest ELF to boot instead of the built-in test guest.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub guest: Option<PathBuf>,
    /// Fault in all guest memory before the guest starts.
    #[serde(default)]
    pub prealloc: bool,
    /// A virtio-net card on one of the host's networks; none: no card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetDefinition>,
    /// A virtio-blk disk on storage every host it migrates to shares (the
    /// same path there); none: no disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskDefinition>,
}

/// The VM's disk: a raw image on shared storage (NFS, Ceph, or here one
/// file), which every host the VM moves to sees at the same path and whose
/// lock moves with the VM in the blackout; or, with `local`, an image the
/// migration copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskDefinition {
    /// The image's absolute path.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Attach it read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The image is on this host's own storage: a migration copies it with
    /// the memory (pre-copy only) into the destination's state directory,
    /// where the VM then runs on it. The source's image is left as it was
    /// at the move.
    #[serde(default)]
    pub local: bool,
}

impl DiskDefinition {
    /// The `--disk` value for `ferry run` and `ferry receive`.
    pub fn flag(&self) -> String {
        let ro = if self.readonly { ",readonly" } else { "" };
        format!("path={}{ro}", self.path.display())
    }
}

/// The VM's network card: which of the host's networks (`[[network]]`
/// in host.toml) it joins, and its MAC, which moves with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetDefinition {
    /// The network's name; every host the VM migrates to must have it.
    pub network: String,
    /// A unicast MAC, `52:54:00:12:34:56`; default: one generated (in
    /// 52:54:00:xx:xx:xx) and recorded at creation.
    #[serde(default)]
    pub mac: Option<String>,
}

fn one() -> u32 {
    1
}

fn idle() -> String {
    "idle".into()
}

/// How the VM may be migrated. Stored with it now; migrations read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationPolicy {
    /// The blackout to aim for, milliseconds.
    #[serde(default = "default_downtime")]
    pub downtime_ms: f64,
    /// Send-rate cap, bytes per second; none: unlimited.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Brake a guest that outruns the link.
    #[serde(default = "yes")]
    pub allow_auto_converge: bool,
    /// Let `auto` (or an operator) switch to post-copy.
    #[serde(default)]
    pub allow_postcopy: bool,
    /// A migration not done by then is aborted, the VM left on the source.
    #[serde(default = "default_completion_timeout")]
    pub completion_timeout_ms: u64,
}

fn default_downtime() -> f64 {
    10.0
}

fn yes() -> bool {
    true
}

fn default_completion_timeout() -> u64 {
    300_000
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self {
            downtime_ms: default_downtime(),
            bandwidth: None,
            allow_auto_converge: true,
            allow_postcopy: false,
            completion_timeout_ms: default_completion_timeout(),
        }
    }
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Lower-case letters, digits and '-', at most 63; default: a fresh
    /// `vm-` id.
    #[serde(default)]
    pub id: Option<String>,
    pub definition: VmDefinition,
    #[serde(default)]
    pub policy: MigrationPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Its VMM is starting.
    Creating,
    Running,
    Paused,
    /// Its VMM ended cleanly.
    Stopped,
    /// Its VMM died or never came up; `reason` says why.
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 5] = [
        Self::Creating,
        Self::Running,
        Self::Paused,
        Self::Stopped,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// True while a VMM process should exist (and holds its capacity).
    pub fn is_live(self) -> bool {
        matches!(self, Self::Creating | Self::Running | Self::Paused)
    }
}

/// One VM as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub id: String,
    pub definition: VmDefinition,
    pub policy: MigrationPolicy,
    pub state: VmState,
    /// Why it failed or stopped.
    pub reason: Option<String>,
    /// The VMM process.
    pub pid: Option<u32>,
    /// The kernel's start time of `pid` (clock ticks since boot, field 22
    /// of /proc/PID/stat): a reused pid never matches it.
    pub pid_start_time: Option<u64>,
    #[schema(value_type = String)]
    pub api_socket: PathBuf,
    #[schema(value_type = String)]
    pub log: PathBuf,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The tap this host made for the VM's card, while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<HostTap>,
}

/// A tap the agent created on one of its networks for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostTap {
    /// The tap's interface name (`fy` and 8 hex digits).
    pub name: String,
    /// The network it was made on, and where that network's bridge was.
    pub network: String,
    pub bridge: String,
    pub netns: Option<String>,
}

/// The guest's latest heartbeat, as its VMM saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub seq: u64,
    pub err: u64,
    pub stall_us: u64,
    pub max_stall_us: u64,
    pub wr: u64,
    pub ver: u64,
    pub sequence_breaks: u64,
}

impl From<ferry_control::GuestFacts> for Heartbeat {
    fn from(g: ferry_control::GuestFacts) -> Self {
        Self {
            seq: g.seq,
            err: g.err,
            stall_us: g.stall_us,
            max_stall_us: g.max_stall_us,
            wr: g.wr,
            ver: g.ver,
            sequence_breaks: g.sequence_breaks,
        }
    }
}

/// What the VMM answered just now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveFacts {
    pub uptime_ms: f64,
    pub paused: bool,
    pub heartbeat: Option<Heartbeat>,
}

/// `GET /v1/vms/{id}`: the record and, for a live VM, what its VMM says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    #[serde(flatten)]
    pub record: VmRecord,
    /// None when the VM is not live or its VMM did not answer.
    pub live: Option<LiveFacts>,
    /// Why `live` is missing for a live VM.
    pub live_error: Option<String>,
}

/// `POST /v1/vms/{id}/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Absolute path of the snapshot file to write.
    #[schema(value_type = String)]
    pub path: PathBuf,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDone {
    #[schema(value_type = String)]
    pub path: PathBuf,
    pub file_bytes: u64,
    pub pause_ms: f64,
}

/// Every error the API answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A short machine-readable kind: bad_request, not_found, conflict,
    /// no_capacity, payload_too_large, vmm_error, internal.
    pub error: String,
    /// What went wrong, for a person.
    pub reason: String,
}
