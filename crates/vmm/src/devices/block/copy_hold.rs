//! Write-blocking for a disk copied with the VM (`--copy-storage`): once
//! the guest writes its disk faster than the link carries the copy, each
//! of its writes completes only after the copy has sent the block it
//! wrote, so the guest cannot dirty blocks faster than they leave and the
//! copy converges (QEMU's `copy-mode=write-blocking` of drive-mirror).
//!
//! The copy sends in rounds, each built from one harvest of the dirty
//! blocks ([`DirtyBlocks::harvest`]). A write marked after harvest `h` is
//! in harvest `h + 1` at the latest, so it waits until the round built
//! from that harvest has been sent. This only paces the guest: whether a
//! block is sent never depends on it, since every block marked is in a
//! later harvest and the blackout sends the last ones.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::dirty::DirtyBlocks;

/// The longest a write waits for the copy. A copy that stops sending
/// (its link stalled, the migration failing) must not hang the guest's
/// disk; a write released this way is still marked, so it is sent later.
/// Well inside the 30 s after which a Linux guest declares a request
/// timed out, and above a round of a slow link (a 1 MiB round at 2 MiB/s
/// held writes up to 2 s).
pub const LONGEST_HOLD: Duration = Duration::from_secs(5);

/// Whether writes wait for the copy, and how far the copy has sent.
#[derive(Debug, Default)]
pub struct CopyHold {
    state: Mutex<HoldState>,
    sent: Condvar,
}

#[derive(Debug, Default)]
struct HoldState {
    on_since: Option<Instant>,
    /// Every harvest up to this one has had its round sent.
    sent_harvest: u64,
    totals: HoldTotals,
}

/// What write-blocking did in one migration.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HoldTotals {
    /// From the switch to write-blocking to its end (the pause, or the
    /// migration's end).
    pub blocking: Duration,
    /// Guest writes that waited for the copy.
    pub writes_held: u64,
    /// Their waits, added up, and the longest.
    pub held: Duration,
    pub longest: Duration,
    /// Writes released by [`LONGEST_HOLD`] rather than by the copy.
    pub released_unsent: u64,
}

/// A write to wait for: the harvest whose round must be sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldTicket(u64);

impl CopyHold {
    /// Starts write-blocking (a no-op when on already). The totals start
    /// afresh with a migration's first switch.
    pub fn start(&self, dirty: &DirtyBlocks) {
        let mut s = self.state.lock().unwrap();
        if s.on_since.is_none() {
            s.on_since = Some(Instant::now());
            s.sent_harvest = dirty.harvests();
        }
    }

    /// Ends write-blocking and lets every waiting write complete.
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap();
        if let Some(since) = s.on_since.take() {
            s.totals.blocking += since.elapsed();
        }
        drop(s);
        self.sent.notify_all();
    }

    pub fn is_on(&self) -> bool {
        self.state.lock().unwrap().on_since.is_some()
    }

    /// For a write that `dirty` has just marked: the ticket to wait on,
    /// or None when writes do not wait. Read after the mark, so a harvest
    /// between the two makes the write wait one round more, never less.
    pub fn ticket(&self, dirty: &DirtyBlocks) -> Option<HoldTicket> {
        self.is_on().then(|| HoldTicket(dirty.harvests() + 1))
    }

    /// Waits until the copy has sent what the ticket's write marked, the
    /// hold ends, or [`LONGEST_HOLD`] passes.
    pub fn wait(&self, ticket: HoldTicket) {
        let start = Instant::now();
        let mut s = self.state.lock().unwrap();
        while s.on_since.is_some() && s.sent_harvest < ticket.0 {
            let waited = start.elapsed();
            if waited >= LONGEST_HOLD {
                s.totals.released_unsent += 1;
                break;
            }
            s = self.sent.wait_timeout(s, LONGEST_HOLD - waited).unwrap().0;
        }
        let held = start.elapsed();
        s.totals.writes_held += 1;
        s.totals.held += held;
        s.totals.longest = s.totals.longest.max(held);
    }

    /// The copy sent the round built from the newest harvest of `dirty`:
    /// the writes that round carried may complete.
    pub fn round_sent(&self, dirty: &DirtyBlocks) {
        let mut s = self.state.lock().unwrap();
        s.sent_harvest = s.sent_harvest.max(dirty.harvests());
        drop(s);
        self.sent.notify_all();
    }

    /// The totals so far (with a hold still on counted up to now).
    pub fn totals(&self) -> HoldTotals {
        let s = self.state.lock().unwrap();
        let mut t = s.totals;
        if let Some(since) = s.on_since {
            t.blocking += since.elapsed();
        }
        t
    }

    /// Forgets an earlier migration's totals (the hold must be off).
    pub fn reset_totals(&self) {
        let mut s = self.state.lock().unwrap();
        debug_assert!(s.on_since.is_none());
        s.totals = HoldTotals::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rig() -> (Arc<DirtyBlocks>, Arc<CopyHold>) {
        let d = Arc::new(DirtyBlocks::new(1 << 20));
        d.set_tracking(true);
        (d, Arc::new(CopyHold::default()))
    }

    /// A writer thread: marks block 0, takes its ticket and waits; says
    /// when it is released.
    fn writer(d: &Arc<DirtyBlocks>, h: &Arc<CopyHold>) -> std::sync::mpsc::Receiver<Duration> {
        let (d, h) = (d.clone(), h.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let start = Instant::now();
            d.mark(0, 4096);
            if let Some(t) = h.ticket(&d) {
                h.wait(t);
            }
            let _ = tx.send(start.elapsed());
        });
        rx
    }

    #[test]
    fn without_the_hold_a_write_never_waits() {
        let (d, h) = rig();
        assert_eq!(h.ticket(&d), None);
        let done = writer(&d, &h);
        assert!(done.recv_timeout(Duration::from_secs(1)).is_ok());
        assert_eq!(h.totals().writes_held, 0);
    }

    #[test]
    fn a_held_write_completes_once_the_round_that_carries_it_is_sent() {
        let (d, h) = rig();
        h.start(&d);
        let done = writer(&d, &h);
        std::thread::sleep(Duration::from_millis(50));
        // The round sent now was harvested before the write: not enough.
        h.round_sent(&d);
        assert!(done.recv_timeout(Duration::from_millis(100)).is_err());
        // The next harvest takes the write's block; its round is sent.
        let bits = d.harvest();
        assert_eq!(bits[0] & 1, 1);
        h.round_sent(&d);
        let waited = done.recv_timeout(Duration::from_secs(1)).unwrap();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        let t = h.totals();
        assert_eq!((t.writes_held, t.released_unsent), (1, 0));
        assert!(t.longest >= Duration::from_millis(100) && t.blocking >= t.longest);
    }

    #[test]
    fn stopping_the_hold_releases_every_waiting_write() {
        let (d, h) = rig();
        h.start(&d);
        let writers: Vec<_> = (0..3).map(|_| writer(&d, &h)).collect();
        std::thread::sleep(Duration::from_millis(50));
        h.stop();
        for w in writers {
            assert!(w.recv_timeout(Duration::from_secs(1)).is_ok());
        }
        assert!(!h.is_on());
        assert_eq!(h.ticket(&d), None);
        // The blocks are still marked: the copy sends them later.
        assert_eq!(d.harvest()[0] & 1, 1);
    }

    #[test]
    fn a_copy_that_stops_sending_holds_a_write_no_longer_than_the_limit() {
        let (d, h) = rig();
        h.start(&d);
        let done = writer(&d, &h);
        let waited = done.recv_timeout(LONGEST_HOLD * 3).unwrap();
        assert!(
            waited >= LONGEST_HOLD && waited < LONGEST_HOLD * 2,
            "{waited:?}"
        );
        assert_eq!(h.totals().released_unsent, 1);
    }
}
