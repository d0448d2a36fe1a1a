//! Finding a virtio device: the virtio-mmio slots sit at QEMU microvm's
//! addresses (Ferry uses the same layout, slot 0 for net, slot 1 for
//! block), 0x200 bytes each. Every register read is a VM exit, so a slot
//! costs one read (MagicValue) when empty, and two (DeviceID) when it holds
//! a transport; the scan stops at the first device of the type asked for.

use crate::time::rdtsc;

/// Guest-physical address of slot 0.
pub const SLOTS_BASE: u64 = 0xfeb0_0000;
/// Bytes per slot: the register block and the device's config space.
pub const SLOT_SIZE: usize = 0x200;
/// Slots QEMU microvm may populate.
pub const SLOTS: u32 = 24;

/// MagicValue, "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const REG_MAGIC: u64 = 0x000;
const REG_DEVICE_ID: u64 = 0x008;
/// DeviceID of a network card.
pub const DEVICE_ID_NET: u32 = 1;
/// DeviceID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// A device found in a slot, and what finding it cost.
pub struct Found {
    pub slot: u32,
    pub addr: u64,
    /// Register reads the scan made, and the TSC ticks they took.
    pub reads: u32,
    pub ticks: u64,
}

/// What the scan saw when it found no device of the type asked for.
pub struct NotFound {
    /// Slots that answered with the magic value (transports with or
    /// without a device behind them).
    pub transports: u32,
}

/// Scans the slots for the first device whose DeviceID is `device_id`.
pub fn find(device_id: u32) -> Result<Found, NotFound> {
    let start = rdtsc();
    let mut reads = 0;
    let mut transports = 0;
    for slot in 0..SLOTS {
        let addr = SLOTS_BASE + u64::from(slot) * SLOT_SIZE as u64;
        reads += 1;
        if read_reg(addr + REG_MAGIC) != MAGIC {
            continue;
        }
        transports += 1;
        reads += 1;
        if read_reg(addr + REG_DEVICE_ID) == device_id {
            return Ok(Found {
                slot,
                addr,
                reads,
                ticks: rdtsc().wrapping_sub(start),
            });
        }
    }
    Err(NotFound { transports })
}

/// One 32-bit read of a virtio-mmio register.
fn read_reg(addr: u64) -> u32 {
    // SAFETY: the low 4 GiB are identity-mapped and reachable from ring 3
    // (README, "Network"); a virtio-mmio register read has no side
    // effect, and an address no device claims reads as something other
    // than the magic value.
    unsafe { (addr as *const u32).read_volatile() }
}
