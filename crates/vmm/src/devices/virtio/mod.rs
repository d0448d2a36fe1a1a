//! Virtio devices over the virtio-mmio transport (version 2, "modern").
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] gives it
//! the register file the driver talks to, the queues the driver set up,
//! and an eventfd per queue that KVM signals on QueueNotify (an ioeventfd,
//! so a notification never waits for a userspace round-trip).

pub mod attach;
pub mod mmio;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Feature bits every device here may offer.
pub mod features {
    /// The modern interface (mandatory on virtio-mmio version 2).
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// InterruptStatus bits (virtio 1.2, 4.2.2).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// What a device tells its transport from its worker: used buffers (the
/// interrupt status the driver may read) and a broken queue (the device
/// needs a reset). No interrupt line is raised: the guests here poll.
#[derive(Debug, Default)]
pub struct DeviceSignals {
    interrupt_status: AtomicU32,
    needs_reset: AtomicBool,
}

impl DeviceSignals {
    /// Buffers were used and the driver asked to be told.
    pub fn used_buffer(&self) {
        self.interrupt_status
            .fetch_or(INTERRUPT_USED_BUFFER, Ordering::AcqRel);
    }

    /// The driver handed the device something it must not touch: the
    /// device stops using its queues until the driver resets it, and says
    /// so with DEVICE_NEEDS_RESET.
    pub fn mark_broken(&self, why: &str) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio device needs a reset: {why}");
        }
        self.interrupt_status
            .fetch_or(INTERRUPT_CONFIG_CHANGE, Ordering::AcqRel);
    }

    pub fn is_broken(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    pub(crate) fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.interrupt_status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub(crate) fn clear(&self) {
        self.interrupt_status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    pub(crate) fn restore(&self, interrupt_status: u32, needs_reset: bool) {
        self.interrupt_status
            .store(interrupt_status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    /// All of guest RAM; writes through it are tracked as the VMM's own
    /// (vm-memory's bitmap), so migration copies them.
    pub memory: GuestMemory,
    /// The queues as the driver configured them (validated).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver writes that
    /// queue's index to QueueNotify.
    pub notifiers: Vec<EventFd>,
    /// The features the driver accepted.
    pub acked_features: u64,
    pub signals: Arc<DeviceSignals>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the device's worker: {0}")]
    Worker(std::io::Error),
    #[error("the device cannot run with these queues: {0}")]
    Queues(String),
}

/// A virtio device behind a transport. The transport owns the register
/// file and the queue configuration; the device owns the work.
pub trait VirtioDevice: Send + 'static {
    /// The device's own state for the state record (its config space and
    /// whatever it learnt), without the transport's part.
    type State: Clone + std::fmt::Debug + Serialize + DeserializeOwned;

    /// The virtio device id (1 = network, 2 = block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; their number is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features offered (VERSION_1 must be among them).
    fn features(&self) -> u64;
    /// Reads the device's config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device's config space; most devices ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving and forgets the queues (driver reset).
    fn reset(&mut self);
    /// Returns once the device no longer touches guest memory, and keeps
    /// it so until [`resume`](Self::resume). The VM is paused around this.
    fn pause(&mut self);
    fn resume(&mut self);
    /// The live queue positions of an activated device (only stable while
    /// paused); None when not activated.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    fn save(&self) -> Self::State;
}

/// A queue's state in the state record (virtio-queue's `QueueState`, which
/// is untrusted until `Queue::try_from` validated it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecord {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueRecord {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueRecord> for QueueState {
    fn from(q: QueueRecord) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}
