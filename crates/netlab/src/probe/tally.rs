//! Counting numbered replies: which arrived, which twice, which after a
//! later one, the longest silence between arrivals and the longest round
//! trip.

use std::time::{Duration, Instant};

/// What one arrival was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    New,
    Duplicate,
    /// A sequence number never sent.
    Unknown,
}

#[derive(Default)]
pub(crate) struct Tally {
    /// Sequence numbers (from 1) already seen, as a bitset.
    seen: Vec<u64>,
    pub(crate) received: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) unknown: u64,
    highest: u64,
    last_arrival: Option<Instant>,
    pub(crate) longest_gap: Option<(Duration, Instant)>,
    pub(crate) longest_rtt: Option<Duration>,
}

impl Tally {
    /// Records the arrival of `seq` at `now`; `sent_at` is when it was
    /// sent, None when it never was. `baseline` is when the first request
    /// left, so a slow first reply counts as a gap too.
    pub(crate) fn record(
        &mut self,
        seq: u64,
        now: Instant,
        sent_at: Option<Instant>,
        baseline: Instant,
    ) -> Arrival {
        let Some(sent_at) = sent_at.filter(|_| seq > 0) else {
            self.unknown += 1;
            return Arrival::Unknown;
        };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        if seq < self.highest {
            self.out_of_order += 1;
        }
        self.highest = self.highest.max(seq);
        let rtt = now.saturating_duration_since(sent_at);
        self.longest_rtt = Some(self.longest_rtt.map_or(rtt, |r| r.max(rtt)));
        let from = self.last_arrival.unwrap_or(baseline);
        self.note_gap(from, now);
        self.last_arrival = Some(now);
        Arrival::New
    }

    fn note_gap(&mut self, from: Instant, to: Instant) {
        let gap = to.saturating_duration_since(from);
        if self.longest_gap.is_none_or(|(g, _)| gap > g) {
            self.longest_gap = Some((gap, from));
        }
    }

    /// When requests went unanswered, the silence from the last arrival to
    /// `last_send` (when the probe stopped asking) counts as a gap too.
    pub(crate) fn close(&mut self, sent: u64, baseline: Instant, last_send: Option<Instant>) {
        if self.received < sent {
            if let Some(end) = last_send {
                self.note_gap(self.last_arrival.unwrap_or(baseline), end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_reordering_and_gaps() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut t = Tally::default();
        assert_eq!(t.record(1, ms(1), Some(ms(0)), t0), Arrival::New);
        assert_eq!(t.record(3, ms(2), Some(ms(1)), t0), Arrival::New);
        assert_eq!(t.record(2, ms(3), Some(ms(1)), t0), Arrival::New);
        assert_eq!(t.record(2, ms(4), Some(ms(1)), t0), Arrival::Duplicate);
        assert_eq!(t.record(9, ms(5), None, t0), Arrival::Unknown);
        assert_eq!(t.record(4, ms(50), Some(ms(3)), t0), Arrival::New);
        assert_eq!(
            (t.received, t.duplicated, t.out_of_order, t.unknown),
            (4, 1, 1, 1)
        );
        assert_eq!(t.longest_gap, Some((Duration::from_millis(47), ms(3))));
        assert_eq!(t.longest_rtt, Some(Duration::from_millis(47)));
        t.close(4, t0, Some(ms(60)));
        assert_eq!(t.longest_gap.unwrap().0, Duration::from_millis(47));
    }

    #[test]
    fn unanswered_requests_at_the_end_count_as_a_gap() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut t = Tally::default();
        t.record(1, ms(1), Some(ms(0)), t0);
        t.close(300, t0, Some(ms(300)));
        assert_eq!(t.longest_gap, Some((Duration::from_millis(299), ms(1))));
        let mut none = Tally::default();
        none.close(5, t0, Some(ms(5)));
        assert_eq!(none.longest_gap, Some((Duration::from_millis(5), t0)));
    }
}
