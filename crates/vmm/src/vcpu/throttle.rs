//! Auto-converge's brake: a thread that parks every vCPU for a share of
//! each short period, so a guest that dirties memory faster than the link
//! sends it slows down in proportion, while it keeps running (and keeps its
//! TCP connections alive) instead of stopping for a long blackout.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::gate::RunGate;
use super::kick;

/// One throttle cycle: short enough that the guest sees many small stalls
/// (each under its heartbeat period), long enough that a pause is worth
/// the kick it costs.
const PERIOD: Duration = Duration::from_millis(5);
/// Never stop the guest completely: it must still make progress.
pub const MAX_PERCENT: u32 = 99;

/// A running throttle; stops (and lets the vCPUs run) when dropped, at
/// once: its thread sleeps in a wait that the drop ends.
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
        self.quit.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Real-time priority of the brake's thread. It sleeps nearly all the
/// time; when it wakes to let the vCPUs go it must not wait behind the
/// threads that use the cores they left (the migration's, which may even
/// have started it at a lower priority): a late release is a longer stall
/// than the brake meant.
const BRAKE_RT_PRIORITY: libc::c_int = 50;

fn brake(gate: &RunGate, threads: &[libc::pthread_t], share: &AtomicU32, quit: &AtomicBool) {
    let rt = libc::sched_param {
        sched_priority: BRAKE_RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler reads the sched_param we pass; pid 0 is
    // this thread. Where the host refuses, the brake keeps normal
    // scheduling and only releases later than it should.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) };
    while !quit.load(Ordering::Acquire) {
        let percent = share.load(Ordering::Relaxed);
        let stopped = PERIOD * percent / 100;
        if !stopped.is_zero() {
            gate.set_brake(true);
            for &t in threads {
                // SAFETY: the ids are of vCPU threads the Vm joins only after
                // dropping this throttle, so each still names a live thread;
                // the signal's handler is installed before any vCPU starts.
                unsafe { libc::pthread_kill(t, kick::kick_signal()) };
            }
            sleep_unless_quit(stopped, quit);
            gate.set_brake(false);
        }
        sleep_unless_quit(PERIOD - stopped, quit);
    }
}

/// Sleeps for `span`, or less if the throttle is dropped meanwhile (its
/// drop unparks this thread).
fn sleep_unless_quit(span: Duration, quit: &AtomicBool) {
    let deadline = Instant::now() + span;
    while !quit.load(Ordering::Acquire) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::park_timeout(left);
    }
}
