//! Auto-converge's brake: a thread that parks every vCPU for a share of
//! each short period, so a guest that dirties memory faster than the link
//! sends it slows down in proportion, while it keeps running (and keeps its
//! TCP connections alive) instead of stopping for a long blackout.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::gate::{RunGate, Want};
use super::kick;

/// One throttle cycle: short enough that the guest sees many small stalls
/// (each under its heartbeat period), long enough that a pause is worth
/// the kick it costs.
const PERIOD: Duration = Duration::from_millis(20);
/// Never stop the guest completely: it must still make progress.
pub const MAX_PERCENT: u32 = 99;

/// A running throttle; stops (and leaves the vCPUs running) when dropped.
pub struct Throttle {
    percent: Arc<AtomicU32>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts braking `vcpu_threads` (pthread ids of live vCPU threads,
    /// which must outlive this throttle) by `percent` of every period.
    pub fn start(
        gate: Arc<RunGate>,
        vcpu_threads: Vec<libc::pthread_t>,
        percent: u32,
    ) -> std::io::Result<Self> {
        let share = Arc::new(AtomicU32::new(percent.min(MAX_PERCENT)));
        let quit = Arc::new(AtomicBool::new(false));
        let thread = {
            let (share, quit) = (share.clone(), quit.clone());
            std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || brake(&gate, &vcpu_threads, &share, &quit))?
        };
        Ok(Self {
            percent: share,
            quit,
            thread: Some(thread),
        })
    }

    pub fn set(&self, percent: u32) {
        self.percent
            .store(percent.min(MAX_PERCENT), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn brake(gate: &RunGate, threads: &[libc::pthread_t], share: &AtomicU32, quit: &AtomicBool) {
    while !quit.load(Ordering::Relaxed) {
        let percent = share.load(Ordering::Relaxed);
        let stopped = PERIOD * percent / 100;
        if !stopped.is_zero() {
            gate.set(Want::Pause);
            for &t in threads {
                // SAFETY: the ids are of vCPU threads the Vm joins only after
                // dropping this throttle, so each still names a live thread;
                // the signal's handler is installed before any vCPU starts.
                unsafe { libc::pthread_kill(t, kick::kick_signal()) };
            }
            std::thread::sleep(stopped);
            gate.set(Want::Run);
        }
        std::thread::sleep(PERIOD - stopped);
    }
}
