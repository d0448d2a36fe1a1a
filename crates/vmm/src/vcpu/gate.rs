//! The pause/resume/stop state every vCPU thread obeys. The controller sets
//! what it wants and kicks the threads; `pause` returns only once every vCPU
//! is really parked outside KVM_RUN (or has exited), so its state can be read.
//! Auto-converge's brake parks the vCPUs through the same gate, on a flag of
//! its own, so a pause never has to wait for the brake to let go.
//!
//! The gate also keeps the two instants a migration's downtime is measured
//! between: when the last vCPU stopped running guest code, and when the
//! first one ran it again.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Want {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

#[derive(Default)]
struct Counts {
    parked: usize,
    exited: usize,
    /// Since when no vCPU runs guest code; None while one does.
    all_stopped_at: Option<Instant>,
    /// When a vCPU first entered the guest after the last `set(Run)`.
    running_since: Option<Instant>,
    /// When each vCPU last left the guest: a vCPU woken from a park and
    /// parked again before it entered the guest keeps its earlier instant.
    last_stop: Vec<Option<Instant>>,
}

pub struct RunGate {
    want: AtomicU8,
    /// The brake parks the vCPUs too, while the controller still wants them
    /// to run.
    brake: AtomicBool,
    /// Set until some vCPU notes that it enters the guest again.
    awaiting_run: AtomicBool,
    counts: Mutex<Counts>,
    changed: Condvar,
    vcpus: usize,
}

impl RunGate {
    pub fn new(vcpus: usize, initial: Want) -> Self {
        Self {
            want: AtomicU8::new(initial as u8),
            brake: AtomicBool::new(false),
            awaiting_run: AtomicBool::new(true),
            counts: Mutex::new(Counts {
                last_stop: vec![None; vcpus],
                ..Counts::default()
            }),
            changed: Condvar::new(),
            vcpus,
        }
    }

    /// What a vCPU thread must do now; cheap enough for every exit.
    pub fn wanted(&self) -> Want {
        match self.want.load(Ordering::Acquire) {
            0 if self.brake.load(Ordering::Acquire) => Want::Pause,
            0 => Want::Run,
            1 => Want::Pause,
            _ => Want::Stop,
        }
    }

    /// What the controller asked for, whatever the brake does.
    pub fn controller_wants(&self) -> Want {
        match self.want.load(Ordering::Acquire) {
            0 => Want::Run,
            1 => Want::Pause,
            _ => Want::Stop,
        }
    }

    /// vCPU `index` parks here while a pause (or the brake) is wanted;
    /// `ran` says whether it entered the guest since it last parked.
    /// Returns what is wanted once it is no longer a pause.
    pub fn park(&self, index: usize, ran: bool) -> Want {
        let mut counts = self.counts.lock().unwrap();
        counts.parked += 1;
        if let Some(slot) = counts.last_stop.get_mut(index) {
            if ran || slot.is_none() {
                *slot = Some(Instant::now());
            }
        }
        self.note_if_all_stopped(&mut counts);
        self.changed.notify_all();
        while self.wanted() == Want::Pause {
            counts = self.changed.wait(counts).unwrap();
        }
        counts.parked -= 1;
        counts.all_stopped_at = None;
        self.changed.notify_all();
        self.wanted()
    }

    /// A vCPU thread is about to enter the guest: the first one after a
    /// `set(Run)` records the instant.
    pub fn note_running(&self) {
        if self.awaiting_run.load(Ordering::Relaxed) {
            let mut counts = self.counts.lock().unwrap();
            if self.awaiting_run.swap(false, Ordering::AcqRel) {
                counts.running_since = Some(Instant::now());
                self.changed.notify_all();
            }
        }
    }

    /// A vCPU thread is gone for good (guest exit, error, stop).
    pub fn mark_exited(&self) {
        let mut counts = self.counts.lock().unwrap();
        counts.exited += 1;
        self.note_if_all_stopped(&mut counts);
        self.changed.notify_all();
    }

    fn note_if_all_stopped(&self, counts: &mut Counts) {
        if counts.parked + counts.exited >= self.vcpus && counts.all_stopped_at.is_none() {
            let now = Instant::now();
            let latest = counts.last_stop.iter().map(|t| t.unwrap_or(now)).max();
            counts.all_stopped_at = Some(latest.unwrap_or(now).min(now));
        }
    }

    pub fn set(&self, want: Want) {
        let mut counts = self.counts.lock().unwrap();
        if want == Want::Run && self.controller_wants() != Want::Run {
            counts.running_since = None;
            self.awaiting_run.store(true, Ordering::Release);
        }
        self.want.store(want as u8, Ordering::Release);
        self.changed.notify_all();
    }

    /// The brake on or off; it parks the vCPUs only while the controller
    /// wants them to run.
    pub fn set_brake(&self, on: bool) {
        let _counts = self.counts.lock().unwrap();
        self.brake.store(on, Ordering::Release);
        self.changed.notify_all();
    }

    /// Waits until every vCPU is parked or exited; since when, or None on
    /// timeout. The instant can precede the call: vCPUs the brake had
    /// parked already stopped then.
    pub fn wait_all_stopped(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut counts = self.counts.lock().unwrap();
        loop {
            if counts.parked + counts.exited >= self.vcpus {
                return counts.all_stopped_at;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            counts = self.changed.wait_timeout(counts, left).unwrap().0;
        }
    }

    /// Waits until a vCPU has entered the guest since the last `set(Run)`;
    /// when it did, or None on timeout.
    pub fn wait_running(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut counts = self.counts.lock().unwrap();
        loop {
            if let Some(t) = counts.running_since {
                return Some(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            counts = self.changed.wait_timeout(counts, left).unwrap().0;
        }
    }

    /// How many vCPU threads have exited.
    pub fn exited(&self) -> usize {
        self.counts.lock().unwrap().exited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_thread_then_resume_releases_them() {
        let gate = Arc::new(RunGate::new(2, Want::Run));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || loop {
                    match gate.wanted() {
                        Want::Run => std::thread::yield_now(),
                        Want::Pause => {
                            if gate.park(0, true) == Want::Stop {
                                gate.mark_exited();
                                return;
                            }
                        }
                        Want::Stop => {
                            gate.mark_exited();
                            return;
                        }
                    }
                })
            })
            .collect();
        gate.set(Want::Pause);
        assert!(gate.wait_all_stopped(Duration::from_secs(5)).is_some());
        gate.set(Want::Run);
        gate.set(Want::Stop);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.exited(), 2);
    }
}
