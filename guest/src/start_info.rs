//! Reading the PVH `hvm_start_info` the VMM (or QEMU) hands over in RSI:
//! the command line and the memory map. Both are copied out at boot, before
//! anything writes the working set, so it does not matter where the VMM put
//! them.

/// `hvm_start_info.magic`
const MAGIC: u32 = 0x336e_c578;
/// Longest command line accepted; a longer one is an error rather than
/// silently cut.
pub const CMDLINE_MAX: usize = 1024;
/// RAM ranges kept from the memory map.
const RAM_MAX: usize = 32;
/// Memory map entry type for usable RAM.
const E820_RAM: u32 = 1;

/// The PVH boot structure (xen/include/public/arch-x86/hvm/start_info.h).
#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // version >= 1:
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// A usable RAM range, `[start, end)` in guest-physical bytes.
#[derive(Clone, Copy, Default)]
pub struct Ram {
    pub start: u64,
    pub end: u64,
}

/// What the guest keeps from `hvm_start_info`.
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    ram: [Ram; RAM_MAX],
    ram_len: usize,
}

impl BootInfo {
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The usable RAM ranges (type 1), as the memory map listed them.
    pub fn ram(&self) -> &[Ram] {
        &self.ram[..self.ram_len]
    }
}

/// Copies the command line and the RAM ranges out of the `hvm_start_info`
/// at guest-physical `paddr`.
pub fn read(paddr: u64) -> Result<BootInfo, &'static str> {
    if paddr == 0 || !paddr.is_multiple_of(8) {
        return Err("no hvm_start_info (RSI/EBX is 0 or misaligned)");
    }
    // SAFETY: the boot contract (README) makes RSI/EBX the address of a
    // valid hvm_start_info in identity-mapped RAM; read_unaligned asks
    // nothing more of it.
    let info = unsafe { (paddr as *const HvmStartInfo).read_unaligned() };
    if info.magic != MAGIC {
        return Err("hvm_start_info magic is not 0x336ec578");
    }
    let mut out = BootInfo {
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
        ram: [Ram::default(); RAM_MAX],
        ram_len: 0,
    };

    if info.cmdline_paddr != 0 {
        let src = info.cmdline_paddr as *const u8;
        loop {
            // SAFETY: cmdline_paddr points at a NUL-terminated string in
            // identity-mapped RAM (PVH contract); we stop at its NUL or
            // at CMDLINE_MAX + 1 bytes.
            let b = unsafe { src.add(out.cmdline_len).read_volatile() };
            if b == 0 {
                break;
            }
            if out.cmdline_len == CMDLINE_MAX {
                return Err("command line longer than 1024 bytes");
            }
            out.cmdline[out.cmdline_len] = b;
            out.cmdline_len += 1;
        }
    }

    if info.version >= 1 && info.memmap_paddr != 0 {
        let entries = info.memmap_paddr as *const HvmMemmapEntry;
        for i in 0..info.memmap_entries as usize {
            // SAFETY: memmap_paddr points at memmap_entries entries in
            // identity-mapped RAM (PVH contract, version >= 1).
            let e = unsafe { entries.add(i).read_unaligned() };
            if e.kind == E820_RAM && e.size != 0 && out.ram_len < RAM_MAX {
                out.ram[out.ram_len] = Ram {
                    start: e.addr,
                    end: e.addr.saturating_add(e.size),
                };
                out.ram_len += 1;
            }
        }
    }
    Ok(out)
}
