//! virtio-net on a tap: the guest's frames go out of the tap and the
//! tap's frames into the guest's receive buffers, each behind the 12-byte
//! virtio_net_hdr_v1. A worker thread serves both queues by polling with
//! notifications suppressed while traffic flows. [`NetHandle`] holds the
//! controls a live migration needs: hold the tap's frames at the pause,
//! hand them over, inject frames, and announce the MAC on a new host.

mod frames;
pub mod tap;
mod worker;

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_netlab::MacAddr;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::virtio::{features, ActivateError, Activation, VirtioDevice};
use tap::{Tap, VNET_HDR_LEN};
use worker::Worker;

/// The virtio device id of a network card.
pub const DEVICE_TYPE_NET: u32 = 1;
/// The device has a MAC in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The config space has a status word (link up).
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;
/// Entries per queue the device offers (the guest uses 64).
pub const QUEUE_SIZE: u16 = 256;
/// Frames kept while held; more are dropped (and counted).
pub const HOLD_CAPACITY: usize = 4096;
/// Frames waiting to be injected, at most.
const INJECT_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot use tap {tap}: {reason}")]
    Tap { tap: String, reason: String },
    #[error("MAC {0} is not a unicast address")]
    NotUnicast(MacAddr),
    #[error("writing to tap {tap} failed: {source}")]
    Write { tap: String, source: std::io::Error },
}

/// Which tap, where, and the card's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub netns: Option<String>,
    pub mac: MacAddr,
}

/// The MAC Ferry gives a card when none is asked for (locally
/// administered, unicast).
pub const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0x46, 0x52, 0x00, 0x00, 0x01]);

/// The card's own part of the state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    /// The IPv4 address the guest was seen sending from, if any.
    pub guest_ip: Option<[u8; 4]>,
}

/// Counters, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Frames given to the guest (injected ones included).
    pub rx_frames: u64,
    /// Frames the guest sent out of the tap.
    pub tx_frames: u64,
    /// Frames held now.
    pub held: u64,
    /// Frames lost: held beyond the capacity, too big for the guest's
    /// buffer, or refused by a full tap.
    pub dropped: u64,
    pub injected: u64,
    pub announced: u64,
}

/// What the worker and the handles share.
pub(crate) struct Shared {
    tap: Tap,
    mac: MacAddr,
    guest_ip: Mutex<Option<Ipv4Addr>>,
    held: AtomicBool,
    held_frames: Mutex<VecDeque<Vec<u8>>>,
    /// A frame (with its header) taken from the tap or the inject queue
    /// that found no receive buffer yet: the oldest the guest has not had.
    rx_pending: Mutex<Option<Vec<u8>>>,
    inject: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes the worker (a frame to inject, a release).
    wake: vmm_sys_util::eventfd::EventFd,
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
    dropped: AtomicU64,
    injected: AtomicU64,
    announced: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Keeps a frame (without its header) the tap gave while held. The
    /// worker decides to hold before it reads the tap, and a round can
    /// take long (a post-copy destination's waits on missing pages): a
    /// frame read after `release` goes to the guest behind the released
    /// ones, never into a queue nobody empties any more.
    fn hold_frame(&self, frame: &[u8]) {
        let mut held = self.held_frames.lock().unwrap();
        if !self.held.load(Ordering::Acquire) {
            // Released meanwhile (`release` clears the flag under this
            // lock, so its frames are in the inject queue already).
            let mut inject = self.inject.lock().unwrap();
            if inject.len() >= INJECT_CAPACITY {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                inject.push_back(frame.to_vec());
            }
            drop(inject);
            drop(held);
            self.wake();
            return;
        }
        if held.len() >= HOLD_CAPACITY {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            held.push_back(frame.to_vec());
        }
    }

    fn learn_ip(&self, frame: &[u8]) {
        if let Some(ip) = frames::sender_ipv4(frame) {
            let mut known = self.guest_ip.lock().unwrap();
            if *known != Some(ip) {
                *known = Some(ip);
            }
        }
    }
}

/// The controls of a network card, cloneable, usable from any thread. A
/// handle keeps the tap open: drop every handle to free it for another VM.
#[derive(Clone)]
pub struct NetHandle {
    shared: Arc<Shared>,
}

impl NetHandle {
    pub fn mac(&self) -> MacAddr {
        self.shared.mac
    }

    pub fn tap_name(&self) -> &str {
        self.shared.tap.name()
    }

    /// The guest's IPv4 address as seen in what it sent (ARP or IPv4).
    pub fn guest_ip(&self) -> Option<Ipv4Addr> {
        *self.shared.guest_ip.lock().unwrap()
    }

    /// Stops giving the tap's frames to the guest and keeps them instead
    /// (at most [`HOLD_CAPACITY`]; more are dropped and counted).
    ///
    /// A frame that waited for a receive buffer goes first among the held
    /// ones: after a commit it belongs to the destination like the rest,
    /// and after an abort it still reaches the guest before them.
    pub fn hold(&self) {
        self.shared.held.store(true, Ordering::Release);
        let waiting = self.shared.rx_pending.lock().unwrap().take();
        if let Some(frame) = waiting {
            let plain = frame.get(VNET_HDR_LEN..).unwrap_or_default().to_vec();
            self.shared.held_frames.lock().unwrap().push_front(plain);
        }
        self.shared.wake();
    }

    /// Gives held frames (those not taken) and new ones to the guest again.
    pub fn release(&self) {
        {
            let mut held = self.shared.held_frames.lock().unwrap();
            let mut inject = self.shared.inject.lock().unwrap();
            // Under the lock: a frame the worker holds from now on sees it
            // (see `Shared::hold_frame`) and follows these.
            self.shared.held.store(false, Ordering::Release);
            while let Some(f) = held.pop_front() {
                if inject.len() >= INJECT_CAPACITY {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    inject.push_back(f);
                }
            }
        }
        self.shared.wake();
    }

    pub fn is_held(&self) -> bool {
        self.shared.held.load(Ordering::Acquire)
    }

    /// The frames held so far (plain Ethernet frames, oldest first);
    /// holding goes on.
    pub fn take_held(&self) -> Vec<Vec<u8>> {
        self.shared.held_frames.lock().unwrap().drain(..).collect()
    }

    /// Delivers `frame` (a plain Ethernet frame) to the guest as if it
    /// came from the tap, before any frame the tap gives afterwards.
    pub fn inject(&self, frame: &[u8]) {
        {
            let mut inject = self.shared.inject.lock().unwrap();
            if inject.len() >= INJECT_CAPACITY {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            inject.push_back(frame.to_vec());
        }
        self.shared.injected.fetch_add(1, Ordering::Relaxed);
        self.shared.wake();
    }

    /// Tells the network where the card now is: one RARP in QEMU's form,
    /// and a gratuitous ARP when the guest's address is known (`ip`, or
    /// else the one learnt).
    pub fn announce(&self, ip: Option<Ipv4Addr>) -> Result<(), NetError> {
        let mut out = vec![ferry_netlab::rarp_frame(self.shared.mac).to_vec()];
        if let Some(ip) = ip.or_else(|| self.guest_ip()) {
            out.push(ferry_netlab::garp_frame(self.shared.mac, ip).to_vec());
        }
        for frame in out {
            let mut buf = vec![0u8; VNET_HDR_LEN];
            buf.extend_from_slice(&frame);
            self.shared
                .tap
                .write_frame(&buf)
                .map_err(|source| NetError::Write {
                    tap: self.shared.tap.name().to_string(),
                    source,
                })?;
            self.shared.announced.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn stats(&self) -> NetStats {
        let s = &self.shared;
        NetStats {
            rx_frames: s.rx_frames.load(Ordering::Relaxed),
            tx_frames: s.tx_frames.load(Ordering::Relaxed),
            held: s.held_frames.lock().unwrap().len() as u64,
            dropped: s.dropped.load(Ordering::Relaxed),
            injected: s.injected.load(Ordering::Relaxed),
            announced: s.announced.load(Ordering::Relaxed),
        }
    }
}

/// The virtio-net device.
pub struct Net {
    shared: Arc<Shared>,
    worker: Option<Worker>,
    paused: bool,
}

impl Net {
    /// Opens the tap `config` names; nothing is started until the driver
    /// activates the device.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        if config.mac.0[0] & 1 != 0 {
            return Err(NetError::NotUnicast(config.mac));
        }
        let tap = Tap::open(&config.tap, config.netns.as_deref())?;
        let wake = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(|e| NetError::Tap {
                tap: config.tap.clone(),
                reason: format!("cannot make its wake-up eventfd: {e}"),
            })?;
        Ok(Net {
            shared: Arc::new(Shared {
                tap,
                mac: config.mac,
                guest_ip: Mutex::new(None),
                held: AtomicBool::new(false),
                held_frames: Mutex::new(VecDeque::new()),
                rx_pending: Mutex::new(None),
                inject: Mutex::new(VecDeque::new()),
                wake,
                rx_frames: AtomicU64::new(0),
                tx_frames: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                injected: AtomicU64::new(0),
                announced: AtomicU64::new(0),
            }),
            worker: None,
            paused: false,
        })
    }

    /// Continues a card saved elsewhere: the saved MAC wins over the
    /// configured one (the guest knows it), and the learnt IP comes back.
    /// Called before the VM starts, while no handle exists.
    pub fn apply_state(&mut self, state: &NetState) {
        let ip = state.guest_ip.map(Ipv4Addr::from);
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => {
                shared.mac = MacAddr(state.mac);
                *shared.guest_ip.get_mut().unwrap() = ip;
            }
            None => {
                // A handle was taken early: the MAC stays, the IP follows.
                tracing::warn!("network card state applied after a handle was taken");
                *self.shared.guest_ip.lock().unwrap() = ip;
            }
        }
    }

    pub fn handle(&self) -> NetHandle {
        NetHandle {
            shared: self.shared.clone(),
        }
    }
}

impl VirtioDevice for Net {
    type State = NetState;

    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.shared.mac.0);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.reset();
        let worker = Worker::start(self.shared.clone(), activation, self.paused)
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self) {
        self.paused = true;
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        self.paused = false;
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.worker.as_ref().map(Worker::queue_states)
    }

    fn save(&self) -> NetState {
        NetState {
            mac: self.shared.mac.0,
            guest_ip: self.handle().guest_ip().map(|ip| ip.octets()),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}
