//! The guest-physical memory map: where RAM lives and where the VMM puts the
//! boot structures the guest finds at entry (all below 1 MiB, under the ELF).

use vm_memory::GuestAddress;

/// The guest's GDT (10 entries, see `boot::gdt`).
pub const GDT_ADDR: u64 = 0x500;
/// The 64-bit TSS, followed by its I/O permission bitmap.
pub const TSS_ADDR: u64 = 0x1000;
/// The PVH `hvm_start_info` the guest reads its command line and RAM from.
pub const START_INFO_ADDR: u64 = 0x4000;
/// The PVH memory map entries (`hvm_memmap_table_entry`).
pub const MEMMAP_ADDR: u64 = 0x4100;
/// Most entries the memory map may hold.
pub const MEMMAP_MAX_ENTRIES: usize = 8;
/// The NUL-terminated guest command line.
pub const CMDLINE_ADDR: u64 = 0x5000;
/// Longest command line, NUL included.
pub const CMDLINE_MAX: usize = 0x1000;
/// PML4, then one PDPT, then one page directory per GiB mapped.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The page directories must end below the EBDA-ish area at 0x9f000.
pub const PD_END: u64 = 0x9f000;
/// How many GiB of address space the identity map can cover.
pub const MAX_MAPPED_GIB: u64 = (PD_END - PD_ADDR) / 0x1000;

/// Where guest images are loaded (the ELF's own addresses must be at or
/// above this, so they cannot overwrite the boot structures).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: RAM beyond 3 GiB continues at 4 GiB, as on a PC.
pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const MMIO_HOLE_END: u64 = 4 << 30;

/// KVM on Intel needs three pages for the real-mode TSS; they sit in the
/// MMIO hole so they never overlap RAM.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The guest's RAM as (start, length) ranges for a RAM size in bytes.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// One past the highest guest-physical RAM address.
pub fn ram_end(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes)
        .last()
        .map(|(start, len)| start.0 + len)
        .unwrap_or(0)
}

// The boot structures must not overlap each other or the guest image.
const _: () = {
    assert!(GDT_ADDR + 10 * 8 <= TSS_ADDR);
    assert!(TSS_ADDR + 0x68 + 8192 < START_INFO_ADDR);
    assert!(MEMMAP_ADDR + (MEMMAP_MAX_ENTRIES as u64) * 24 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= PML4_ADDR);
    assert!(PD_END <= HIMEM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        assert_eq!(ram_end(1 << 30), 1 << 30);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(6 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 3 << 30));
        assert_eq!(ram_end(6 << 30), 7 << 30);
    }
}
