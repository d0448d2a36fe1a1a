//! Live tuning of a running migration (`PATCH /v1/migrations/{id}`,
//! `ferry migration tune`): the VM's API thread writes here while the
//! engine is busy sending; the pacer follows the bandwidth cap at its next
//! batch, and the round loop takes a new downtime target or a switch to
//! post-copy between rounds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// No new downtime target is waiting.
const NO_TARGET: u64 = u64::MAX;

#[derive(Debug)]
pub struct Tuning {
    /// The cap the pacers follow, bytes per second; 0: uncapped.
    bandwidth: AtomicU64,
    /// A new downtime target in microseconds, not yet taken by the engine.
    downtime_us: AtomicU64,
    /// The operator asked for a switch to post-copy.
    postcopy: AtomicBool,
}

impl Tuning {
    /// Tuning that starts at the migration's own `--bandwidth`.
    pub fn new(bandwidth: Option<u64>) -> Self {
        Self {
            bandwidth: AtomicU64::new(bandwidth.unwrap_or(0)),
            downtime_us: AtomicU64::new(NO_TARGET),
            postcopy: AtomicBool::new(false),
        }
    }

    /// The cap now in force; None: uncapped.
    pub fn bandwidth(&self) -> Option<u64> {
        Some(self.bandwidth.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// A new cap (0: uncapped), followed from the next batch on.
    pub fn set_bandwidth(&self, bytes_per_sec: u64) {
        self.bandwidth.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// A new downtime target for the rounds still to come.
    pub fn set_downtime(&self, target: Duration) {
        let us = u64::try_from(target.as_micros()).unwrap_or(NO_TARGET - 1);
        self.downtime_us
            .store(us.min(NO_TARGET - 1), Ordering::SeqCst);
    }

    /// The new downtime target, if one was set since the last call.
    pub fn take_downtime(&self) -> Option<Duration> {
        match self.downtime_us.swap(NO_TARGET, Ordering::SeqCst) {
            NO_TARGET => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn request_postcopy(&self) {
        self.postcopy.store(true, Ordering::SeqCst);
    }

    /// Whether a switch to post-copy was asked for since the last call.
    pub fn take_postcopy(&self) -> bool {
        self.postcopy.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_downtime_target_is_taken_once() {
        let t = Tuning::new(None);
        assert_eq!(t.take_downtime(), None);
        t.set_downtime(Duration::from_micros(5500));
        assert_eq!(t.take_downtime(), Some(Duration::from_micros(5500)));
        assert_eq!(t.take_downtime(), None);
    }

    #[test]
    fn zero_bandwidth_means_uncapped() {
        let t = Tuning::new(Some(50 << 20));
        assert_eq!(t.bandwidth(), Some(50 << 20));
        t.set_bandwidth(0);
        assert_eq!(t.bandwidth(), None);
    }

    #[test]
    fn a_postcopy_request_is_taken_once() {
        let t = Tuning::new(None);
        assert!(!t.take_postcopy());
        t.request_postcopy();
        assert!(t.take_postcopy());
        assert!(!t.take_postcopy());
    }
}
