//! The per-vCPU token bucket that holds a dirty workload at RATE/cpus MiB/s.
//!
//! Credit is kept in exact integer units: one page costs `cpus * tsc_hz`
//! units and every TSC tick earns `RATE * 256` units (RATE MiB/s is
//! RATE * 256 pages/s for the whole VM), so no rate is ever rounded. The
//! bucket holds at most 10 ms of pages (at least one batch), so a vCPU that
//! was stopped (a migration's downtime) does not sprint to catch up.

use crate::time::Tsc;

/// Longest burst the bucket allows, in time at the configured rate.
const BURST_MS: u64 = 10;

pub struct Bucket {
    credit: u128,
    earn_per_tick: u128,
    page_cost: u128,
    cap: u128,
    last: u64,
}

impl Bucket {
    /// A bucket for one of `cpus` vCPUs sharing `rate_mibs` MiB/s, starting
    /// empty at TSC `now`. `batch` pages must always fit in it.
    pub fn new(rate_mibs: u64, cpus: u32, tsc: Tsc, now: u64, batch: u64) -> Self {
        let earn_per_tick = u128::from(rate_mibs) * 256;
        let page_cost = u128::from(cpus) * u128::from(tsc.hz());
        let cap = (u128::from(batch) * page_cost)
            .max(earn_per_tick * u128::from(tsc.ticks_from_ms(BURST_MS)));
        Self {
            credit: 0,
            earn_per_tick,
            page_cost,
            cap,
            last: now,
        }
    }

    /// Adds the credit earned up to TSC `now` and takes up to `want` pages'
    /// worth; returns how many pages may be written now.
    pub fn take(&mut self, now: u64, want: u64) -> u64 {
        let elapsed = now.saturating_sub(self.last);
        self.last = now;
        let earned = u128::from(elapsed).saturating_mul(self.earn_per_tick);
        self.credit = self.credit.saturating_add(earned).min(self.cap);
        // At most `want` (a small batch) subtractions: no u128 division.
        let mut pages = 0;
        while pages < want && self.credit >= self.page_cost {
            self.credit -= self.page_cost;
            pages += 1;
        }
        pages
    }
}
