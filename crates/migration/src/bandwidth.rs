//! `--bandwidth`: a pacer that holds the send rate to its cap over any
//! window of 100 ms or more, give or take one batch, which the engine keeps
//! small (a few ms of the rate) when a cap is set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tuning::Tuning;

/// Pacing state for one stream.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: Option<u64>,
    /// When the bytes sent so far may all have left at the capped rate.
    next_free: Option<Instant>,
    /// A cap an operator may change while the migration runs, and how
    /// many streams share it.
    live: Option<(Arc<Tuning>, u64)>,
}

impl Pacer {
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.filter(|&r| r > 0),
            next_free: None,
            live: None,
        }
    }

    /// A pacer that follows the live cap of `tuning`, this stream's share
    /// of it being one of `streams`.
    pub fn following(tuning: Arc<Tuning>, streams: u64) -> Self {
        let streams = streams.max(1);
        let mut pacer = Self::new(tuning.bandwidth().map(|b| (b / streams).max(1)));
        pacer.live = Some((tuning, streams));
        pacer
    }

    /// Takes up a changed live cap; the old cap's backlog is forgotten.
    fn refresh(&mut self) {
        if let Some((tuning, streams)) = &self.live {
            let now = tuning.bandwidth().map(|b| (b / *streams).max(1));
            if now != self.bytes_per_sec {
                self.bytes_per_sec = now;
                self.next_free = None;
            }
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.bytes_per_sec
    }

    /// The largest batch to build under this cap: about 5 ms of the rate,
    /// so one batch can never push a 100 ms window far over the cap.
    pub fn batch_bytes(&self, max: usize) -> usize {
        match self.bytes_per_sec {
            None => max,
            Some(rate) => ((rate / 200) as usize).clamp(64 << 10, max),
        }
    }

    /// How long to wait before sending `bytes` more; the caller sleeps it.
    /// Time not used earlier is not banked: an idle stream does not earn a
    /// burst.
    pub fn delay_for(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refresh();
        let Some(rate) = self.bytes_per_sec else {
            return Duration::ZERO;
        };
        let start = self.next_free.map_or(now, |t| t.max(now));
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next_free = Some(start + cost);
        start.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut p = Pacer::new(None);
        assert_eq!(p.delay_for(1 << 30, Instant::now()), Duration::ZERO);
        assert_eq!(p.batch_bytes(8 << 20), 8 << 20);
    }

    #[test]
    fn a_capped_stream_spaces_its_batches() {
        let mut p = Pacer::new(Some(100 << 20));
        assert_eq!(p.batch_bytes(8 << 20), (100 << 20) / 200);
        let t0 = Instant::now();
        // Simulate sending 1 MiB batches at once: each waits for the last.
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited = p.delay_for(1 << 20, t0);
        }
        // The tenth batch may start after nine have left at 100 MiB/s.
        assert!((waited.as_secs_f64() - 0.09).abs() < 1e-6, "{waited:?}");
        // Idle time is not banked.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(p.delay_for(1 << 20, later), Duration::ZERO);
        assert!(p.delay_for(1 << 20, later) > Duration::ZERO);
    }
}
