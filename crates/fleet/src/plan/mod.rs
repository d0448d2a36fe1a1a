//! A plan: what the fleet will do about one trigger (a drain, an
//! evacuation, an operator's move), VM by VM, persisted so that it can be
//! shown before it runs (the dry run), executed, cancelled, resumed, and
//! picked up by the next scheduler after a restart. Every entry holds its
//! state and, while it waits, the reason in words.

pub mod drain;
pub mod dry_run;
pub mod predict;

use serde::{Deserialize, Serialize};

use crate::policy::Priority;
use crate::time::Timestamp;

pub use drain::{prepare_drain, DrainError};
pub use dry_run::{dry_run, DryRun};
pub use predict::{predict, Predicted};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PlanKind {
    /// Planned maintenance: every VM off the hosts.
    Drain { hosts: Vec<String> },
    /// Failing hosts: every VM off them, first of all.
    Evacuate { hosts: Vec<String>, reason: String },
    /// An operator moves one VM.
    Move { vm: String, to: Option<String> },
}

impl PlanKind {
    pub fn priority(&self) -> Priority {
        match self {
            Self::Drain { .. } => Priority::Maintenance,
            Self::Evacuate { .. } => Priority::Evacuation,
            Self::Move { .. } => Priority::OperatorRequest,
        }
    }

    /// The hosts the plan empties.
    pub fn hosts(&self) -> &[String] {
        match self {
            Self::Drain { hosts } | Self::Evacuate { hosts, .. } => hosts,
            Self::Move { .. } => &[],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// Prepared; nothing started. The dry run's figures are in it.
    Draft,
    /// Some VM cannot move: the plan does not start (see its entries).
    Refused,
    Running,
    /// Stopped by the operator: migrations in flight were cancelled back
    /// to their sources; resume picks it up where it stopped.
    Cancelled,
    /// Every entry ended (some may have failed: see them).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    Migrate,
    Terminate { restart: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum EntryState {
    /// Waiting for its turn; `reason` says what for.
    Pending,
    /// Written before the migrator is asked to start it (so a scheduler
    /// that dies in between finds the id and asks the migrator about it).
    Migrating {
        migration: String,
        target: String,
        started_at: Timestamp,
        deadline: Timestamp,
        postcopy: bool,
    },
    Migrated {
        target: String,
        started_at: Timestamp,
        finished_at: Timestamp,
    },
    Terminated {
        restarted_on: Option<String>,
        at: Timestamp,
    },
    /// Tried `attempts` times; reported, left running where it was.
    Failed,
    /// Cannot move at all (found when the plan was prepared).
    Blocked,
    Cancelled,
}

impl EntryState {
    /// True when nothing more happens to the entry.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Migrated { .. } | Self::Terminated { .. } | Self::Failed | Self::Blocked
        )
    }

    pub fn word(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Migrating { .. } => "migrating",
            Self::Migrated { .. } => "migrated",
            Self::Terminated { .. } => "terminated",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    pub vm: String,
    pub tenant: String,
    /// The host the VM leaves.
    pub source: String,
    pub action: Action,
    /// The target the dry run chose (a prediction), then the one used.
    pub target: Option<String>,
    /// The migration alone on the link, from its dirty rate, with the
    /// setup its source and target measured (plan::predict).
    pub predicted_ms: u64,
    /// When the dry run predicts it ends, from the plan's start.
    pub predicted_end_ms: Option<u64>,
    pub state: EntryState,
    /// Why it waits, failed or is blocked.
    pub reason: Option<String>,
    /// Migrations started for it so far.
    pub attempts: u32,
    /// Targets that failed it.
    pub avoid: Vec<String>,
    /// One line per attempt that did not succeed.
    pub history: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub kind: PlanKind,
    pub priority: Priority,
    pub state: PlanState,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// The dry run's drain time, milliseconds from the start.
    pub predicted_duration_ms: Option<u64>,
    pub entries: Vec<PlanEntry>,
}

impl Plan {
    /// Entries in each state, by the state's word.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        for e in &self.entries {
            *m.entry(e.state.word()).or_insert(0) += 1;
        }
        m
    }

    pub fn blocked(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries
            .iter()
            .filter(|e| e.state == EntryState::Blocked)
    }
}
