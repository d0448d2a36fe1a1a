//! A host as the fleet knows it: what it can hold, where it stands (rack,
//! zone), whether it is well, what it runs and whether it is due for
//! maintenance.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Resources;
use crate::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Health {
    Healthy,
    /// A failure signal (the operator's or the agent's own checks): its VMs
    /// are evacuated and it receives none.
    Degraded {
        reason: String,
    },
    /// Its agent's lease lapsed: nothing can be asked of it.
    Unreachable {
        since: Timestamp,
    },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy)
    }

    pub fn word(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded { .. } => "degraded",
            Self::Unreachable { .. } => "unreachable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Maintenance {
    None,
    /// Maintenance is due at `at`: the host receives no VM from now on.
    Scheduled {
        at: Timestamp,
    },
    /// A plan is moving its VMs off.
    Draining {
        plan: String,
    },
    /// Empty and handed over to maintenance.
    InMaintenance,
}

impl Maintenance {
    pub fn word(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Scheduled { .. } => "scheduled",
            Self::Draining { .. } => "draining",
            Self::InMaintenance => "in maintenance",
        }
    }
}

/// Ferry's version on the host, major.minor. Hosts upgrade one at a time,
/// and a VM's state record is read by the next minor version and the one
/// before (CONVENTIONS.md), so a VM may move one minor step either way
/// within a major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    pub fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// True when a VM running under self may move to `target`.
    pub fn can_migrate_to(self, target: Version) -> bool {
        self.major == target.major && self.minor.abs_diff(target.minor) <= 1
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub capacity: Resources,
    /// At least `rack` and `zone`.
    pub labels: BTreeMap<String, String>,
    pub health: Health,
    pub version: Version,
    /// CPU features the host offers a guest (a VM needs each of its own).
    pub cpu_features: BTreeSet<String>,
    pub maintenance: Maintenance,
    /// What its migration link carries, bytes per second.
    pub link_bytes_per_sec: u64,
    /// What receiving a VM costs here besides its pages, as the host's
    /// agent measured it; None (a host an operator or a seed wrote, or an
    /// older agent): `ferry bench`'s figure, plan::predict::SETUP_MS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_setup: Option<ReceiveSetup>,
    /// What sending a VM costs here as the source besides the
    /// destination's part and the pages, milliseconds, as its agent
    /// measured it: the job's start and, after the commit, its
    /// confirmation and the old VMM's stop. None: not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_setup_ms: Option<f64>,
}

/// The cost of receiving one VM on a host, besides sending its pages: the
/// destination starts a VMM process for it and reserves (or preallocates)
/// its memory, and the two agents make their API round trips; the first
/// part is the same for every VM, the second grows with its memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReceiveSetup {
    /// Per VM, whatever its size.
    pub fixed_ms: f64,
    /// Per GiB of the VM's memory.
    pub per_gib_ms: f64,
    /// Ended incoming migrations it was measured from; 0: the agent's
    /// default, nothing measured yet.
    #[serde(default)]
    pub samples: u32,
}

impl ReceiveSetup {
    /// The setup of a VM of `mem_bytes`.
    pub fn ms(&self, mem_bytes: u64) -> f64 {
        self.fixed_ms + self.per_gib_ms * mem_bytes as f64 / super::GIB as f64
    }
}

/// A rack name for hosts without a `rack` label.
pub const NO_RACK: &str = "-";

impl Host {
    pub fn rack(&self) -> &str {
        self.labels.get("rack").map_or(NO_RACK, String::as_str)
    }

    pub fn zone(&self) -> &str {
        self.labels.get("zone").map_or(NO_RACK, String::as_str)
    }

    /// True when the host may receive a VM: healthy and not due for
    /// maintenance, draining or in it.
    pub fn accepts_vms(&self) -> bool {
        self.health.is_healthy() && matches!(self.maintenance, Maintenance::None)
    }

    /// Why a migration already on its way here must be aborted: the host
    /// is no longer healthy. (Maintenance scheduled later does not abort
    /// what is in flight.)
    pub fn refusal_as_target(&self) -> Option<String> {
        (!self.health.is_healthy())
            .then(|| format!("target {} became {}", self.name, self.health.word()))
    }

    /// Why the host receives no VM, or None if it does.
    pub fn refusal(&self) -> Option<String> {
        if !self.health.is_healthy() {
            return Some(format!("{} is {}", self.name, self.health.word()));
        }
        match &self.maintenance {
            Maintenance::None => None,
            Maintenance::Scheduled { at } => {
                Some(format!("{} is due for maintenance at {at}", self.name))
            }
            m => Some(format!("{} is {}", self.name, m.word())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_move_one_minor_step_either_way() {
        let v = Version::new(1, 4);
        assert!(v.can_migrate_to(Version::new(1, 5)));
        assert!(v.can_migrate_to(Version::new(1, 3)));
        assert!(v.can_migrate_to(v));
        assert!(!v.can_migrate_to(Version::new(1, 6)));
        assert!(!v.can_migrate_to(Version::new(2, 4)));
    }
}
