//! What the scheduler refuses or fails at.

use crate::model::FleetError;
use crate::plan::{DrainError, PlanState};
use crate::policy::PolicyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored fleet is inconsistent: {0}")]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Drain(#[from] DrainError),
    #[error("no plan {0}")]
    NoPlan(String),
    #[error("plan {plan} does not start: {} VMs cannot move ({})", blocked.len(), first_blocked(blocked))]
    PlanRefused {
        plan: String,
        blocked: Vec<(String, String)>,
    },
    #[error("plan {plan} is {state:?}; {wanted}")]
    WrongState {
        plan: String,
        state: PlanState,
        wanted: &'static str,
    },
}

fn first_blocked(blocked: &[(String, String)]) -> String {
    blocked
        .first()
        .map_or(String::new(), |(vm, why)| format!("{vm}: {why}"))
}
