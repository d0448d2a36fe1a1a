//! What the scheduler asks of the hosts: start a migration, poll it,
//! cancel it, switch it to post-copy; stop a VM, boot one. The simulator
//! implements it here (sim::migrator); ferryd's API implements it in the
//! agent's crate (`ferry_agent::fleet_migrator`, which depends on this
//! crate: the fleet knows nothing of the agent's types).
//!
//! The scheduler names each migration itself (`PLAN/VM/ATTEMPT`) and
//! writes that name to the store before it calls `start`, so that after a
//! crash between the two it can ask `poll` about the name: `Unknown` means
//! the start never happened and it may start again; anything else is the
//! migration it already started, never a second one. An implementation
//! on ferryd keeps the name with the agent's job (or finds the job by VM:
//! the agent holds a VM's lock while it migrates, so there is one).

use crate::model::Vm;
use crate::time::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRequest {
    /// The scheduler's name for it, unique.
    pub id: String,
    pub vm: String,
    pub source: String,
    pub target: String,
    pub allow_postcopy: bool,
    /// The agent aborts (leaving the VM on the source) after this.
    pub completion_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MigrationStatus {
    /// No migration of that name was ever started.
    Unknown,
    Running {
        sent_bytes: u64,
        /// The bytes it is expected to send in all (a prediction).
        expected_bytes: u64,
        elapsed_ms: u64,
    },
    /// The VM runs on the target.
    Committed {
        total_ms: u64,
    },
    /// The VM runs on the source (invariant 1 of DESIGN.md).
    Failed {
        reason: String,
    },
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigratorError {
    /// The host refused (no capacity, incompatible, VM busy): nothing
    /// started; another target may do.
    #[error("{host} refused: {reason}")]
    Refused { host: String, reason: String },
    /// The host did not answer: retry later.
    #[error("{host} did not answer: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("no migration {0}")]
    NoSuchMigration(String),
}

pub trait Migrator {
    fn start(&mut self, req: &MigrationRequest, now: Timestamp) -> Result<(), MigratorError>;
    fn poll(&mut self, id: &str, now: Timestamp) -> Result<MigrationStatus, MigratorError>;
    /// Aborts it back to its source; the VM runs on there.
    fn cancel(&mut self, id: &str, now: Timestamp) -> Result<(), MigratorError>;
    /// Finishes it in post-copy (the VM's policy allowed it).
    fn switch_to_postcopy(&mut self, id: &str, now: Timestamp) -> Result<(), MigratorError>;
    /// Stops the VM on its host (its policy said TERMINATE).
    fn terminate(&mut self, vm: &Vm, now: Timestamp) -> Result<(), MigratorError>;
    /// Boots the VM's definition afresh on `host`.
    fn boot(&mut self, vm: &Vm, host: &str, now: Timestamp) -> Result<(), MigratorError>;
}
