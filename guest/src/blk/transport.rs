//! The MMIO transport as the block driver sees it: VIRTIO_RING_F_EVENT_IDX
//! hidden (with it virtio-drivers asks for an interrupt after every used
//! buffer and cannot be told otherwise; without it the driver sets
//! VRING_AVAIL_F_NO_INTERRUPT, see the network's `notify`), and whether
//! the device offers VIRTIO_BLK_F_FLUSH noted on the way (the driver keeps
//! its negotiated features to itself).

use core::sync::atomic::{AtomicBool, Ordering};

use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Whether the device offered FLUSH (only vCPU 0 uses the disk; the atomic
/// only makes the static shareable).
static FLUSH_OFFERED: AtomicBool = AtomicBool::new(false);

pub fn flush_offered() -> bool {
    FLUSH_OFFERED.load(Ordering::Relaxed)
}

pub struct BlkTransport {
    inner: MmioTransport<'static>,
}

impl BlkTransport {
    pub fn new(inner: MmioTransport<'static>) -> Self {
        Self { inner }
    }
}

impl Transport for BlkTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        let offered = self.inner.read_device_features();
        FLUSH_OFFERED.store(offered & VIRTIO_BLK_F_FLUSH != 0, Ordering::Relaxed);
        offered & !VIRTIO_RING_F_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
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
