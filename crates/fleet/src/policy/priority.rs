//! Why a VM moves, in the order slots are given out.

use serde::{Deserialize, Serialize};

/// Lower sorts first: evacuation, then maintenance, then an operator's
/// request, then rebalancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// The host is failing (degraded).
    Evacuation,
    /// Planned maintenance (a drain).
    Maintenance,
    /// `ferry vm move`.
    OperatorRequest,
    /// Load spread beyond its threshold.
    Rebalancing,
}

impl Priority {
    pub fn word(self) -> &'static str {
        match self {
            Self::Evacuation => "evacuation",
            Self::Maintenance => "maintenance",
            Self::OperatorRequest => "operator request",
            Self::Rebalancing => "rebalancing",
        }
    }
}
