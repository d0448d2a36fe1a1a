//! The thread that serves a network card's two queues. While frames flow
//! it polls every millisecond with notifications suppressed (the guest
//! then never exits to notify); after a quiet spell it re-enables them and
//! sleeps until a notification, a tap frame or a wake-up comes.
//!
//! Everything the guest put in a ring is untrusted: a descriptor outside
//! guest memory, of the wrong direction, a chain longer than any frame, or
//! an avail index that skips ahead of the ring, marks the device broken
//! (DEVICE_NEEDS_RESET) and the worker stops touching the queues.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use super::Shared;
use crate::devices::virtio::{Activation, DeviceSignals};
use crate::memory::GuestMemory;

const RX: usize = 0;
const TX: usize = 1;
/// The largest frame a tap gives or takes (64 KiB GSO aside), header included.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Poll interval while busy, and how long "busy" lasts after the last frame.
const BUSY_POLL: Duration = Duration::from_millis(1);
const BUSY_FOR: Duration = Duration::from_millis(50);
/// Sleep bound when idle (notifications enabled).
const IDLE_POLL_MS: i32 = 100;
/// Frames moved per queue per round, so neither direction starves.
const BATCH: usize = 64;

/// What the worker owns that `pause` and `save` need to see.
struct Rings {
    memory: GuestMemory,
    queues: Vec<Queue>,
    notifications_on: bool,
}

pub(super) struct Worker {
    thread: Option<JoinHandle<()>>,
    rings: Arc<Mutex<Rings>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl Worker {
    pub fn start(shared: Arc<Shared>, a: Activation, paused: bool) -> std::io::Result<Worker> {
        let rings = Arc::new(Mutex::new(Rings {
            memory: a.memory,
            queues: a.queues,
            // Unknown: a restored guest's rings say what the old host's
            // worker last wrote. "Off" makes the worker poll, and write the
            // flags itself once it goes idle.
            notifications_on: false,
        }));
        let paused = Arc::new(AtomicBool::new(paused));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (rings, paused, stop, shared) =
                (rings.clone(), paused.clone(), stop.clone(), shared.clone());
            let notifiers = a.notifiers;
            let signals = a.signals;
            std::thread::Builder::new()
                .name("virtio-net".into())
                .spawn(move || run(&shared, &rings, &paused, &stop, &notifiers, &signals))?
        };
        Ok(Worker {
            thread: Some(thread),
            rings,
            paused,
            stop,
            shared,
        })
    }

    /// Returns once no round is in progress; none starts until `resume`.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
        // A round runs holding the lock: taking it waits for that round.
        drop(self.rings.lock().unwrap());
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.shared.wake();
    }

    pub fn queue_states(&self) -> Vec<QueueState> {
        self.rings
            .lock()
            .unwrap()
            .queues
            .iter()
            .map(|q| q.state())
            .collect()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    shared: &Shared,
    rings: &Mutex<Rings>,
    paused: &AtomicBool,
    stop: &AtomicBool,
    notifiers: &[EventFd],
    signals: &DeviceSignals,
) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut last_work = Instant::now();
    let mut tap_wanted = true;
    while !stop.load(Ordering::Acquire) {
        let busy = last_work.elapsed() < BUSY_FOR;
        let timeout = if busy {
            BUSY_POLL.as_millis() as i32
        } else {
            IDLE_POLL_MS
        };
        wait(shared, notifiers, tap_wanted, timeout);
        if stop.load(Ordering::Acquire) {
            break;
        }
        let held = shared.held.load(Ordering::Acquire);
        if paused.load(Ordering::Acquire) || signals.is_broken() {
            if held {
                drain_tap_to_hold(shared, &mut buf);
            }
            // Not reading the tap: don't let it wake us in a loop.
            tap_wanted = held;
            continue;
        }
        let mut r = rings.lock().unwrap();
        if paused.load(Ordering::Acquire) {
            continue;
        }
        let outcome = round(shared, &mut r, signals, held, &mut buf);
        match outcome {
            Ok(progress) => {
                if progress.moved {
                    last_work = Instant::now();
                }
                tap_wanted = !progress.rx_starved;
                let want_notify = last_work.elapsed() >= BUSY_FOR;
                if want_notify != r.notifications_on {
                    match set_notifications(&mut r, want_notify) {
                        // Buffers came in just before notifications were
                        // on again: the driver did not notify for them.
                        Ok(true) => last_work = Instant::now(),
                        Ok(false) => {}
                        Err(e) => signals.mark_broken(&e),
                    }
                }
            }
            Err(why) => signals.mark_broken(&why),
        }
    }
}

/// Waits for a notification, a wake-up, a tap frame (when wanted) or the
/// timeout, and clears the eventfds.
fn wait(shared: &Shared, notifiers: &[EventFd], tap_wanted: bool, timeout_ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = notifiers
        .iter()
        .map(|e| e.as_raw_fd())
        .chain(std::iter::once(shared.wake.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if tap_wanted {
        fds.push(libc::pollfd {
            fd: shared.tap.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    // SAFETY: `fds` is a valid array of pollfd for the call's duration.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    for e in notifiers.iter().chain(std::iter::once(&shared.wake)) {
        let _ = e.read();
    }
}

fn drain_tap_to_hold(shared: &Shared, buf: &mut [u8]) {
    for _ in 0..BATCH * 4 {
        match shared.tap.read_frame(buf) {
            Ok(Some(n)) if n > VNET_HDR_LEN => shared.hold_frame(&buf[VNET_HDR_LEN..n]),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// Turns the driver's notifications on or off; true when buffers were
/// made available meanwhile (work to do without a notification).
fn set_notifications(r: &mut Rings, on: bool) -> Result<bool, String> {
    let Rings { memory, queues, .. } = r;
    let mut more = false;
    for q in queues.iter_mut() {
        let done = if on {
            q.enable_notification(memory).map(|m| more |= m)
        } else {
            q.disable_notification(memory)
        };
        done.map_err(|e| format!("setting notification suppression: {e}"))?;
    }
    r.notifications_on = on;
    Ok(more)
}

#[derive(Default)]
struct Progress {
    moved: bool,
    rx_starved: bool,
}

/// One pass over both queues.
fn round(
    shared: &Shared,
    r: &mut Rings,
    signals: &DeviceSignals,
    held: bool,
    buf: &mut [u8],
) -> Result<Progress, String> {
    let mut progress = Progress::default();
    let Rings { memory, queues, .. } = r;
    if queues.len() != 2 {
        return Err("the card needs exactly two queues".into());
    }
    let (rxq, txq) = queues.split_at_mut(1);
    let (rxq, txq) = (&mut rxq[RX], &mut txq[TX - 1]);
    let sent = transmit(shared, memory, txq)?;
    if sent > 0 {
        progress.moved = true;
        if txq.needs_notification(memory).map_err(|e| e.to_string())? {
            signals.used_buffer();
        }
    }
    if held {
        drain_tap_to_hold(shared, buf);
    }
    let (received, starved) = {
        let mut pending = shared.rx_pending.lock().unwrap();
        receive(shared, memory, rxq, &mut pending, held, buf)?
    };
    progress.rx_starved = starved;
    if received > 0 {
        progress.moved = true;
        if rxq.needs_notification(memory).map_err(|e| e.to_string())? {
            signals.used_buffer();
        }
    }
    Ok(progress)
}

/// A descriptor of a chain, checked against guest memory.
#[derive(Debug)]
struct Segment {
    addr: vm_memory::GuestAddress,
    len: usize,
}

/// The checked segments of the next chain the driver made available,
/// with its head; None when the ring holds no more.
fn next_chain(
    memory: &GuestMemory,
    q: &mut Queue,
    device_writes: bool,
) -> Result<Option<(u16, Vec<Segment>)>, String> {
    let avail = q
        .avail_idx(memory, Ordering::Acquire)
        .map_err(|e| format!("reading the avail index: {e}"))?;
    let waiting = (avail - Wrapping(q.next_avail())).0;
    if waiting == 0 {
        return Ok(None);
    }
    if waiting > q.size() {
        return Err(format!(
            "the avail index {} is {waiting} entries ahead of the device, more than the ring's {}",
            avail.0,
            q.size()
        ));
    }
    let Some(chain) = q.iter(memory).map_err(|e| e.to_string())?.next() else {
        return Err("an avail ring entry could not be read".into());
    };
    let head = chain.head_index();
    if head >= q.size() {
        return Err(format!("descriptor head {head} is outside the ring"));
    }
    let mut segments = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() != device_writes {
            return Err(format!(
                "descriptor at {:#x} is {} on the {} queue",
                d.addr().0,
                if d.is_write_only() {
                    "device-writable"
                } else {
                    "device-readable"
                },
                if device_writes { "receive" } else { "transmit" }
            ));
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(memory, d.addr(), len) {
            return Err(format!(
                "descriptor {:#x}+{len:#x} lies outside guest memory",
                d.addr().0
            ));
        }
        total += len;
        if total > MAX_FRAME * 2 {
            return Err(format!("a descriptor chain of more than {total} bytes"));
        }
        segments.push(Segment {
            addr: d.addr(),
            len,
        });
    }
    if segments.is_empty() {
        return Err(format!("descriptor chain {head} is empty or broken"));
    }
    Ok(Some((head, segments)))
}

/// Sends every frame the guest queued; returns how many.
fn transmit(shared: &Shared, memory: &GuestMemory, q: &mut Queue) -> Result<usize, String> {
    let mut sent = 0;
    let mut frame = Vec::with_capacity(2048);
    while sent < BATCH {
        let Some((head, segments)) = next_chain(memory, q, false)? else {
            break;
        };
        frame.clear();
        for s in &segments {
            let at = frame.len();
            frame.resize(at + s.len, 0);
            memory
                .read_slice(&mut frame[at..], s.addr)
                .map_err(|e| format!("reading a transmit buffer: {e}"))?;
        }
        if frame.len() < VNET_HDR_LEN + 14 || frame.len() > MAX_FRAME {
            return Err(format!("a transmitted frame of {} bytes", frame.len()));
        }
        // No offloads were negotiated: the header says nothing.
        frame[..VNET_HDR_LEN].fill(0);
        shared.learn_ip(&frame[VNET_HDR_LEN..]);
        match shared.tap.write_frame(&frame) {
            Ok(true) => {
                shared.tx_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) | Err(_) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        q.add_used(memory, head, 0)
            .map_err(|e| format!("returning a transmit buffer: {e}"))?;
        sent += 1;
    }
    Ok(sent)
}

/// Gives the guest injected frames, then the tap's (unless held); returns
/// how many, and whether a frame waits for a buffer.
fn receive(
    shared: &Shared,
    memory: &GuestMemory,
    q: &mut Queue,
    pending: &mut Option<Vec<u8>>,
    held: bool,
    buf: &mut [u8],
) -> Result<(usize, bool), String> {
    let mut delivered = 0;
    while delivered < BATCH {
        let frame = match pending.take() {
            Some(f) => f,
            None => match shared.inject.lock().unwrap().pop_front() {
                Some(plain) => {
                    let mut f = vec![0u8; VNET_HDR_LEN];
                    f.extend_from_slice(&plain);
                    f
                }
                None if held => break,
                None => match shared.tap.read_frame(buf) {
                    Ok(Some(n)) if n > VNET_HDR_LEN => buf[..n].to_vec(),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                },
            },
        };
        let Some((head, segments)) = next_chain(memory, q, true)? else {
            *pending = Some(frame);
            return Ok((delivered, true));
        };
        let room: usize = segments.iter().map(|s| s.len).sum();
        if frame.len() > room {
            // Too big for the buffer the guest gave: drop the frame, keep
            // the buffer for the next one.
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            q.go_to_previous_position();
            continue;
        }
        let mut frame = frame;
        // The header: no offloads, one buffer (num_buffers, VERSION_1).
        frame[..10].fill(0);
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut at = 0;
        for s in &segments {
            if at >= frame.len() {
                break;
            }
            let n = s.len.min(frame.len() - at);
            memory
                .write_slice(&frame[at..at + n], s.addr)
                .map_err(|e| format!("writing a receive buffer: {e}"))?;
            at += n;
        }
        q.add_used(memory, head, frame.len() as u32)
            .map_err(|e| format!("returning a receive buffer: {e}"))?;
        shared.rx_frames.fetch_add(1, Ordering::Relaxed);
        delivered += 1;
    }
    Ok((delivered, false))
}

#[cfg(test)]
mod tests;
