//! The pause/resume/stop state every vCPU thread obeys. The controller sets
//! what it wants and kicks the threads; `pause` returns only once every vCPU
//! is really parked outside KVM_RUN (or has exited), so its state can be read.

use std::sync::atomic::{AtomicU8, Ordering};
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
}

pub struct RunGate {
    want: AtomicU8,
    counts: Mutex<Counts>,
    changed: Condvar,
    vcpus: usize,
}

impl RunGate {
    pub fn new(vcpus: usize, initial: Want) -> Self {
        Self {
            want: AtomicU8::new(initial as u8),
            counts: Mutex::new(Counts::default()),
            changed: Condvar::new(),
            vcpus,
        }
    }

    /// What the controller wants now; cheap enough for every exit.
    pub fn wanted(&self) -> Want {
        match self.want.load(Ordering::Acquire) {
            0 => Want::Run,
            1 => Want::Pause,
            _ => Want::Stop,
        }
    }

    /// A vCPU thread parks here while a pause is wanted; returns what is
    /// wanted once it is no longer a pause.
    pub fn park(&self) -> Want {
        let mut counts = self.counts.lock().unwrap();
        counts.parked += 1;
        self.changed.notify_all();
        while self.wanted() == Want::Pause {
            counts = self.changed.wait(counts).unwrap();
        }
        counts.parked -= 1;
        self.changed.notify_all();
        self.wanted()
    }

    /// A vCPU thread is gone for good (guest exit, error, stop).
    pub fn mark_exited(&self) {
        let mut counts = self.counts.lock().unwrap();
        counts.exited += 1;
        self.changed.notify_all();
    }

    pub fn set(&self, want: Want) {
        let _counts = self.counts.lock().unwrap();
        self.want.store(want as u8, Ordering::Release);
        self.changed.notify_all();
    }

    /// Waits until every vCPU is parked or exited; false on timeout.
    pub fn wait_all_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut counts = self.counts.lock().unwrap();
        while counts.parked + counts.exited < self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            counts = self.changed.wait_timeout(counts, left).unwrap().0;
        }
        true
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
                            if gate.park() == Want::Stop {
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
        assert!(gate.wait_all_stopped(Duration::from_secs(5)));
        gate.set(Want::Run);
        gate.set(Want::Stop);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.exited(), 2);
    }
}
