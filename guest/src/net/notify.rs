//! Notifications the driver owes the device, sent once per poll instead of
//! once per buffer.
//!
//! virtio-drivers decides after every buffer it queues whether the device
//! wants a notification (the used ring's NO_NOTIFY flag, or `avail_event`
//! with VIRTIO_F_EVENT_IDX) and then writes QueueNotify: one MMIO write,
//! one VM exit (~25 us here). Reposting sixteen receive buffers would cost
//! sixteen exits. This transport wraps the MMIO one and only records which
//! queues were to be notified; [`Notifier::flush`] writes each of them once
//! when the poll is done. The decision stays the driver's: a queue whose
//! device suppresses notifications (as Ferry's polling device does) is
//! never written at all.

use core::sync::atomic::{AtomicU32, Ordering};

use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// QueueNotify: the same offset in the legacy and the modern register
/// layout (virtio 1.2, 4.2.2 and 4.2.4).
const REG_QUEUE_NOTIFY: u64 = 0x050;

/// Feature bit 29: `used_event` / `avail_event` notification suppression.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Queues (one bit each) with a notification pending; only vCPU 0 uses
/// the network, the atomic only makes the static shareable.
static PENDING: AtomicU32 = AtomicU32::new(0);

/// The MMIO transport, with notifications deferred.
pub struct DeferredNotify {
    inner: MmioTransport<'static>,
}

impl DeferredNotify {
    /// Wraps `inner` (the device at `addr`) and returns the notifier that
    /// sends what it defers.
    pub fn new(inner: MmioTransport<'static>, addr: u64) -> (Self, Notifier) {
        PENDING.store(0, Ordering::Relaxed);
        (
            Self { inner },
            Notifier {
                reg: addr + REG_QUEUE_NOTIFY,
            },
        )
    }
}

/// Sends the notifications [`DeferredNotify`] recorded.
pub struct Notifier {
    reg: u64,
}

impl Notifier {
    /// Writes QueueNotify once for each queue with a pending notification,
    /// calling `after_each` after each write (an exit).
    pub fn flush(&self, mut after_each: impl FnMut()) {
        let mut pending = PENDING.swap(0, Ordering::Relaxed);
        while pending != 0 {
            let queue = pending.trailing_zeros();
            pending &= pending - 1;
            // SAFETY: `reg` is the QueueNotify register of the device the
            // transport drives (identity-mapped MMIO, reachable from ring
            // 3); writing a queue index there is the notification itself
            // and touches no memory.
            unsafe { (self.reg as *mut u32).write_volatile(queue) };
            after_each();
        }
    }
}

impl Transport for DeferredNotify {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        // Hide VIRTIO_RING_F_EVENT_IDX (see the module documentation).
        self.inner.read_device_features() & !VIRTIO_RING_F_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        // Queues above 31 do not exist on this device (two queues).
        if queue < 32 {
            PENDING.fetch_or(1 << queue, Ordering::Relaxed);
        } else {
            self.inner.notify(queue);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        self.inner.write_config_space(offset, value)
    }
}
