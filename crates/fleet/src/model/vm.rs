//! A VM as the fleet knows it: where it runs, what it takes, how fast it
//! dirties memory, and what its owner wants done with it when its host
//! goes into maintenance.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Resources;

/// GCE's `onHostMaintenance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OnHostMaintenance {
    Migrate,
    Terminate,
}

/// The VM's availability policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    pub on_host_maintenance: OnHostMaintenance,
    /// A terminated VM boots again (a fresh boot of its definition) on
    /// another host.
    pub automatic_restart: bool,
}

impl Default for Availability {
    fn default() -> Self {
        Self {
            on_host_maintenance: OnHostMaintenance::Migrate,
            automatic_restart: true,
        }
    }
}

/// The part of the agent's migration policy the fleet reads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MigrationPolicy {
    /// A migration that misses its completion timeout switches to
    /// post-copy instead of being cancelled.
    pub allow_postcopy: bool,
}

#[allow(clippy::derivable_impls)]
impl Default for MigrationPolicy {
    fn default() -> Self {
        // Post-copy risks the VM on a host crash: never by default.
        Self {
            allow_postcopy: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    Running,
    /// Terminated (per policy) and not restarted: it holds no capacity.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub tenant: String,
    /// The host it runs on (or, stopped, last ran on).
    pub host: String,
    pub resources: Resources,
    /// Guest memory that holds data: what a first pre-copy pass sends
    /// (pages never written are skipped).
    pub populated_bytes: u64,
    /// Measured bytes per second the guest dirties.
    pub dirty_rate: u64,
    pub availability: Availability,
    pub migration: MigrationPolicy,
    /// Groups whose members must not share a host.
    pub anti_affinity: BTreeSet<String>,
    /// CPU features the guest was shown: a target must offer each.
    pub cpu_features: BTreeSet<String>,
    pub state: VmRunState,
}

impl Vm {
    pub fn is_running(&self) -> bool {
        self.state == VmRunState::Running
    }
}
