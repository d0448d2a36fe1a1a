//! The probe's send schedule: slot k is at start + k * interval, so the
//! rate never drifts however long each send takes; a sender that woke too
//! late skips the slots already gone rather than sending them in a burst.

use std::time::{Duration, Instant};

pub(crate) struct Schedule {
    start: Instant,
    interval_ns: u128,
    next: u64,
    /// Slots given up because the sender was more than an interval late.
    pub(crate) skipped: u64,
}

impl Schedule {
    pub(crate) fn new(start: Instant, interval: Duration) -> Schedule {
        Schedule {
            start,
            interval_ns: interval.as_nanos().max(1),
            next: 0,
            skipped: 0,
        }
    }

    fn slot_time(&self, slot: u64) -> Instant {
        let ns = self.interval_ns.saturating_mul(slot as u128);
        self.start + Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// The time of the next slot to send in, given the time now. At most
    /// one slot is ever due at `now`: the later of the next slot and the
    /// last slot that has already begun.
    pub(crate) fn next_slot(&mut self, now: Instant) -> Instant {
        let mut slot = self.slot_time(self.next);
        if now > slot {
            let behind = ((now - slot).as_nanos() / self.interval_ns) as u64;
            if behind > 0 {
                self.skipped += behind;
                self.next += behind;
                slot = self.slot_time(self.next);
            }
        }
        self.next += 1;
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn slots_are_fixed_points_that_do_not_drift() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, MS);
        // Each send took 0.4 ms: the slots stay at whole milliseconds.
        let mut now = t0;
        for k in 0..100u32 {
            let slot = s.next_slot(now);
            assert_eq!(slot, t0 + MS * k);
            now = slot + Duration::from_micros(400);
        }
        assert_eq!(s.skipped, 0);
    }

    #[test]
    fn a_late_sender_skips_missed_slots_instead_of_bursting() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, MS);
        assert_eq!(s.next_slot(t0), t0);
        // Woke at 3.5 ms, with slot 1 next: slots 1 and 2 are gone, slot 3
        // (already begun) is sent now, and slot 4 waits for its time.
        let late = t0 + Duration::from_micros(3500);
        assert_eq!(s.next_slot(late), t0 + MS * 3);
        assert_eq!(s.skipped, 2);
        assert_eq!(s.next_slot(late), t0 + MS * 4);
    }
}
