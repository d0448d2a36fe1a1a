//! Pacing: how many new migrations may start per interval, per rack (of
//! the source) and fleet-wide, so that a failing rack does not stampede the
//! rest of the fleet.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pace {
    /// At most this many starts...
    pub max_starts: u32,
    /// ...in any window of this many milliseconds.
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pacing {
    pub per_rack: Pace,
    pub fleet: Pace,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            per_rack: Pace {
                max_starts: 32,
                interval_ms: 10_000,
            },
            fleet: Pace {
                max_starts: 128,
                interval_ms: 10_000,
            },
        }
    }
}
