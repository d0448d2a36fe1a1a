//! The MMIO bus: routes a vCPU's KVM_EXIT_MMIO to the device whose window
//! holds the address. Devices sit in the virtio-mmio slots of QEMU
//! microvm's layout (0xfeb00000 + 0x200 * N), so the same guest finds its
//! devices under Ferry and under QEMU.

use std::sync::Arc;

/// Guest-physical address of virtio-mmio slot 0.
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
/// Bytes per slot: the register block and the device's config space.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x200;
/// Slots the guest scans.
pub const VIRTIO_MMIO_SLOTS: u32 = 24;
/// The slot the network card takes.
pub const NET_SLOT: u32 = 0;
/// The slot kept for a block device.
pub const BLOCK_SLOT: u32 = 1;

/// Guest-physical address of virtio-mmio slot `slot`.
pub const fn slot_addr(slot: u32) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SLOT_SIZE
}

/// A device reached by memory-mapped I/O. `offset` is relative to the
/// start of the device's window; `data` is the access (1, 2, 4 or 8 bytes).
pub trait MmioDevice: Send + Sync {
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    fn mmio_write(&self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    #[error("MMIO window {base:#x}+{len:#x} overlaps the device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("MMIO window {base:#x}+{len:#x} is empty or wraps around")]
    BadWindow { base: u64, len: u64 },
}

struct Window {
    base: u64,
    len: u64,
    device: Arc<dyn MmioDevice>,
}

/// The devices on the bus, by window. Built before the vCPUs start and
/// never changed afterwards, so lookups take no lock.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`; windows may not overlap.
    pub fn register(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioBusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(MmioBusError::BadWindow { base, len })?;
        if let Some(w) = self
            .windows
            .iter()
            .find(|w| base < w.base + w.len && w.base < end)
        {
            return Err(MmioBusError::Overlap {
                base,
                len,
                other: w.base,
            });
        }
        self.windows.push(Window { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Window, u64)> {
        self.windows.iter().find_map(|w| {
            let offset = addr.checked_sub(w.base)?;
            (offset.checked_add(size as u64)? <= w.len).then_some((w, offset))
        })
    }

    /// A read; an address no device claims reads as zeroes (never as a
    /// virtio magic value, so a scanning guest skips the slot).
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((w, offset)) => w.device.mmio_read(offset, data),
            None => data.fill(0),
        }
    }

    /// A write; writes no device claims are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((w, offset)) = self.find(addr, data.len()) {
            w.device.mmio_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Recorder {
        fn mmio_read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn mmio_write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_of_their_window() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.register(slot_addr(1), VIRTIO_MMIO_SLOT_SIZE, dev.clone())
            .unwrap();
        let mut data = [0xaau8; 4];
        bus.read(slot_addr(1) + 0x10, &mut data);
        assert_eq!(data, [0x10; 4]);
        bus.read(slot_addr(0), &mut data);
        assert_eq!(data, [0; 4], "an empty slot reads as zero");
        bus.write(slot_addr(1) + 0x50, &[1, 0, 0, 0]);
        bus.write(slot_addr(2), &[1]);
        // An access that straddles the window's end is nobody's.
        bus.write(slot_addr(1) + 0x1fe, &[1, 2, 3, 4]);
        assert_eq!(*dev.0.lock().unwrap(), vec![(0x50, vec![1, 0, 0, 0])]);
    }

    #[test]
    fn overlapping_windows_are_refused() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Recorder::default());
        bus.register(slot_addr(0), 0x200, dev.clone()).unwrap();
        assert_eq!(
            bus.register(slot_addr(0) + 0x100, 0x200, dev.clone()),
            Err(MmioBusError::Overlap {
                base: slot_addr(0) + 0x100,
                len: 0x200,
                other: slot_addr(0)
            })
        );
        assert!(matches!(
            bus.register(u64::MAX, 2, dev),
            Err(MmioBusError::BadWindow { .. })
        ));
    }
}
