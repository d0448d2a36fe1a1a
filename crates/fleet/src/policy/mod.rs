//! The rules the planner schedules under: caps on concurrent migrations,
//! the headroom kept on every host, pacing of new migrations, retries and
//! timeouts. A policy is checked whole before it is used; an invalid one
//! is refused with the field, the value and what would be valid.

pub mod caps;
pub mod pacing;
pub mod parse;
pub mod priority;
pub mod retries;
pub mod validate;

use serde::{Deserialize, Serialize};

pub use caps::Caps;
pub use pacing::{Pace, Pacing};
pub use priority::Priority;
pub use retries::Retries;
pub use validate::PolicyError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    #[serde(default)]
    pub caps: Caps,
    /// Share of every host's memory and vCPUs that is never filled by a
    /// migration or a restart, percent.
    #[serde(default = "default_headroom")]
    pub headroom_percent: u32,
    #[serde(default)]
    pub pacing: Pacing,
    #[serde(default)]
    pub retries: Retries,
}

fn default_headroom() -> u32 {
    10
}

impl Default for Policies {
    fn default() -> Self {
        Self {
            caps: Caps::default(),
            headroom_percent: default_headroom(),
            pacing: Pacing::default(),
            retries: Retries::default(),
        }
    }
}
