//! Time as the scheduler sees it: milliseconds on one clock, which is the
//! wall clock (since the UNIX epoch) for a real fleet and a simulated clock
//! starting at zero in the simulator. The planner never reads a clock; it
//! is handed `now`.

use serde::{Deserialize, Serialize};

/// A point in time, milliseconds since the clock's epoch.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn ms(self) -> u64 {
        self.0
    }

    pub fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to self (zero if earlier is later).
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The wall clock now.
    pub fn now_wall() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(d.as_millis() as u64)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t={:.3}s", self.0 as f64 / 1e3)
    }
}
