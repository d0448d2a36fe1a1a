//! A migration as the page shows it: the scheduler's name for it, where
//! it goes, and what its source agent says of it now (its progress while
//! it runs, its report once it ended).

use serde::{Deserialize, Serialize};

use crate::store::Backend;
use crate::time::Timestamp;

/// Supplies the migrations the fleet's migrator started. Called once per
/// request, off the server's async threads, so it may block on the agents
/// (each call bounded by its own timeout).
pub trait MigrationSource: Send + Sync {
    /// `store` is the request's read of the store (its records, such as
    /// the migrator's and the agents' endpoints, are there).
    fn migrations(&self, store: &dyn Backend) -> Vec<MigrationView>;
}

/// A fleet whose migrator keeps no agent jobs (the simulated one).
pub struct NoMigrations;

impl MigrationSource for NoMigrations {
    fn migrations(&self, _store: &dyn Backend) -> Vec<MigrationView> {
        Vec::new()
    }
}

/// The agent's latest progress line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    /// The engine's phase: setup, round, blackout.
    pub phase: String,
    pub round: u32,
    pub sent_bytes: u64,
    /// Still to send in this round.
    pub left_bytes: u64,
    pub dirty_rate_mibs: f64,
    pub throughput_mibs: f64,
    pub elapsed_ms: f64,
}

/// One round of pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    pub round: u32,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    /// Measured at the harvest that ended the round.
    pub dirty_rate_mibs: f64,
    /// Sent with the VM paused.
    pub blackout: bool,
}

/// What the engine reported at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportView {
    pub outcome: String,
    pub mode: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes_sent: u64,
    pub mem_bytes: u64,
    /// (ms since the start, bytes sent so far), thinned to a few hundred
    /// points.
    pub timeline: Vec<(f64, u64)>,
    pub rounds: Vec<RoundView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The scheduler's name for the migration.
    pub id: String,
    pub vm: String,
    pub source: String,
    pub target: String,
    pub started: Timestamp,
    /// The agent's job id (None until the agent's answer was recorded).
    pub job: Option<String>,
    /// The agent's phase (preparing, transferring, committed, failed,
    /// cancelled), or `starting` (no job id yet), or `unknown` (the agent
    /// did not say: see `unknown`).
    pub phase: String,
    pub progress: Option<ProgressView>,
    pub report: Option<ReportView>,
    /// Why it failed or was cancelled, as the agent says.
    pub error: Option<String>,
    /// Why the agent's view is missing (unreachable, no longer known).
    pub unknown: Option<String>,
}

pub const STARTING: &str = "starting";
pub const UNKNOWN: &str = "unknown";

impl MigrationView {
    /// Ended, as its agent says.
    pub fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "committed" | "failed" | "cancelled")
    }

    /// Still running as far as anyone knows (an agent that does not
    /// answer leaves it neither).
    pub fn in_flight(&self) -> bool {
        !self.finished() && self.phase != UNKNOWN
    }
}

/// At most `max` points of `t`, evenly picked, the first and last kept:
/// the page plots a few hundred points, not a sample every 10 ms.
pub fn thin(t: &[(f64, u64)], max: usize) -> Vec<(f64, u64)> {
    if t.len() <= max || max < 2 {
        return t.to_vec();
    }
    let last = t.len() - 1;
    (0..max).map(|i| t[i * last / (max - 1)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_the_ends_and_at_most_max_points() {
        let t: Vec<(f64, u64)> = (0..1000).map(|i| (f64::from(i), i as u64)).collect();
        let s = thin(&t, 100);
        assert_eq!(s.len(), 100);
        assert_eq!(s[0], t[0]);
        assert_eq!(s[99], t[999]);
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(thin(&t[..5], 100).len(), 5);
    }
}
