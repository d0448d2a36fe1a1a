//! What the planner is asked to decide about, and what it answers.

use crate::model::{HostIx, VmIx};
use crate::policy::Priority;
use crate::time::Timestamp;

use super::WaitReason;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkAction {
    /// Live-migrate the VM off its host, to `to` if named.
    Migrate { to: Option<HostIx> },
    /// Stop it (its policy says TERMINATE); with `restart`, boot its
    /// definition afresh on another host.
    Terminate { restart: bool },
}

/// One VM waiting for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    /// The caller's handle, returned in the decision.
    pub key: usize,
    pub vm: VmIx,
    pub priority: Priority,
    pub action: WorkAction,
    /// Hosts not to choose: earlier attempts failed there.
    pub avoid: Vec<HostIx>,
}

/// A migration running now: it holds an outbound slot on its source, an
/// inbound slot and its VM's resources on its target, and a slot of its
/// tenant and of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub vm: VmIx,
    pub source: HostIx,
    pub target: HostIx,
}

/// A migration that started at `at` from a host in `source`'s rack:
/// what pacing counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentStart {
    pub at: Timestamp,
    pub source: HostIx,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start this migration now.
    Migrate {
        key: usize,
        vm: VmIx,
        source: HostIx,
        target: HostIx,
    },
    /// Stop the VM now; boot it on `restart_on` if set. `note` says why
    /// it is not restarted, when it is not.
    Terminate {
        key: usize,
        vm: VmIx,
        restart_on: Option<HostIx>,
        note: Option<WaitReason>,
    },
    /// Nothing now, and why.
    Wait {
        key: usize,
        vm: VmIx,
        reason: WaitReason,
    },
}

impl Decision {
    pub fn key(&self) -> usize {
        match self {
            Self::Migrate { key, .. } | Self::Terminate { key, .. } | Self::Wait { key, .. } => {
                *key
            }
        }
    }
}
