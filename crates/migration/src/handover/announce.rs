//! The destination tells the network where the VM now lives.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guest::GuestError;

/// Sends one announce of the VM's addresses from its new place (for a
/// VMM: one RARP with the VM's MAC, and a gratuitous ARP for its IP when
/// known).
pub trait Announcer: Send + Sync {
    fn announce(&self) -> Result<(), GuestError>;
}

/// When to announce, from the start on the destination.
pub type AnnounceSchedule = &'static [Duration];

/// QEMU's schedule (announce-initial 50 ms, growing by 100 ms, 5 rounds):
/// the first at once, so a switch learns the new port before the next
/// frame to the VM arrives; the later ones for a switch or a host that
/// missed it.
pub const ANNOUNCE_SCHEDULE: AnnounceSchedule = &[
    Duration::ZERO,
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(450),
    Duration::from_millis(800),
];

/// Announces on `schedule` from `t0` on a thread of its own; the thread
/// returns when each announce was sent (ms after `t0`) and any failure.
/// Call it only once the VM is committed here: an announce moves the VM's
/// traffic, so an aborted migration must never have sent one.
pub fn announce_on_schedule(
    announcer: Arc<dyn Announcer>,
    schedule: AnnounceSchedule,
    t0: Instant,
) -> std::io::Result<JoinHandle<(Vec<f64>, Option<String>)>> {
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let mut sent = Vec::with_capacity(schedule.len());
            let mut failure = None;
            for at in schedule {
                std::thread::sleep(at.saturating_sub(t0.elapsed()));
                match announcer.announce() {
                    Ok(()) => sent.push(t0.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        failure.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (sent, failure)
        })
}
