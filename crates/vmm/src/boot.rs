//! Boot: loads the guest ELF and writes everything a vCPU needs to start
//! directly in 64-bit ring 3: identity page tables with the User bit, a GDT
//! with ring-3 segments, a TSS whose I/O bitmap opens the guest's ports (this
//! host ignores IOPL), and a PVH start_info with the command line and RAM map.
//! No guest ring-0 code runs at all: on nested PVM hosts ring 0 is emulated.

use std::io::Cursor;
use std::path::PathBuf;

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::config::GuestImage;
use crate::layout::*;
use crate::memory::GuestMemory;

/// Segment selectors the guest runs with (RPL 3).
pub const USER_CS: u16 = 0x33;
pub const USER_DS: u16 = 0x2b;
pub const TSS_SELECTOR: u16 = 0x40;

/// The GDT: null, kernel code/data (unused, kept for a conventional shape),
/// user data at 0x28, user 64-bit code at 0x30, the TSS at 0x40 (16 bytes).
const GDT: [u64; 8] = [
    0,
    0x00af_9a00_0000_ffff, // 0x08 kernel code64
    0x00cf_9200_0000_ffff, // 0x10 kernel data
    0,
    0,
    0x00cf_f200_0000_ffff, // 0x28 user data, DPL 3
    0x00af_fa00_0000_ffff, // 0x30 user code64, DPL 3
    0,
];

/// Offset of the I/O permission bitmap inside the TSS, and its size: one
/// bit per port, plus the all-ones byte the architecture wants after it.
const IOPB_OFFSET: u64 = 0x68;
const IOPB_BYTES: u64 = 65536 / 8;
pub const TSS_LIMIT: u32 = (IOPB_OFFSET + IOPB_BYTES) as u32;

/// Ports the guest may use from ring 3; every other port faults.
pub const COM1_BASE: u16 = 0x3f8;
pub const GUEST_EXIT_PORT: u16 = 0x501;
const GUEST_PORTS: &[(u16, u16)] = &[
    (COM1_BASE, COM1_BASE + 7),
    (0x40, 0x43), // PIT, for the guest's TSC calibration fallback
    (0x61, 0x61), // PIT gate
    (GUEST_EXIT_PORT, GUEST_EXIT_PORT),
];

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest file {path} does not exist")]
    GuestMissing { path: PathBuf },
    #[error("cannot read guest file {path}: {source}")]
    GuestRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is a Linux bzImage; Ferry boots ELF guests only (and a Linux kernel cannot run on a nested-PVM host)")]
    BzImage { what: String },
    #[error("{what} is not a loadable x86-64 ELF guest: {reason}")]
    NotElf { what: String, reason: String },
    #[error("{what} does not fit in {mem_mib} MiB of guest memory (it ends at {end:#x})")]
    DoesNotFit {
        what: String,
        mem_mib: u64,
        end: u64,
    },
    #[error("the guest command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("writing boot structures into guest memory failed: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Where to start the vCPUs.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub rip: u64,
    pub start_info: u64,
}

/// Loads `image` and writes the boot structures; RAM must be fresh.
pub fn load(
    memory: &GuestMemory,
    mem_bytes: u64,
    image: &GuestImage,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let bytes = read_image(image)?;
    let what = image.describe();
    if is_bzimage(&bytes) {
        return Err(BootError::BzImage { what });
    }
    let loaded = Elf::load(
        memory,
        None,
        &mut Cursor::new(&bytes),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => {
            BootError::DoesNotFit {
                what: what.clone(),
                mem_mib: mem_bytes >> 20,
                end: elf_end(&bytes).unwrap_or(0),
            }
        }
        other => BootError::NotElf {
            what: what.clone(),
            reason: other.to_string(),
        },
    })?;
    if loaded.kernel_end > mem_bytes.min(MMIO_HOLE_START) {
        return Err(BootError::DoesNotFit {
            what,
            mem_mib: mem_bytes >> 20,
            end: loaded.kernel_end,
        });
    }
    write_gdt(memory)?;
    write_tss(memory)?;
    // The low 4 GiB always: the guest reaches its virtio-mmio slots
    // (0xfeb00000..) from ring 3 through this map.
    write_page_tables(memory, ram_end(mem_bytes).max(MMIO_HOLE_END))?;
    write_start_info(memory, mem_bytes, cmdline)?;
    Ok(BootEntry {
        rip: loaded.kernel_load.0,
        start_info: START_INFO_ADDR,
    })
}

fn read_image(image: &GuestImage) -> Result<Vec<u8>, BootError> {
    match image {
        GuestImage::Bytes(b) => Ok(b.to_vec()),
        GuestImage::File(path) => std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BootError::GuestMissing { path: path.clone() }
            } else {
                BootError::GuestRead {
                    path: path.clone(),
                    source,
                }
            }
        }),
    }
}

fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// The end of the highest PT_LOAD segment, for a helpful "does not fit".
fn elf_end(bytes: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    (0..phnum)
        .filter_map(|i| {
            let ph = phoff + i * phentsize;
            let ptype = u32::from_le_bytes(bytes.get(ph..ph + 4)?.try_into().ok()?);
            (ptype == 1).then(|| Some(u64_at(ph + 0x18)? + u64_at(ph + 0x28)?))?
        })
        .max()
}

fn write_gdt(memory: &GuestMemory) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(BootError::Write)?;
    }
    let (low, high) = tss_descriptor(TSS_ADDR, TSS_LIMIT);
    let tss_slot = GDT_ADDR + u64::from(TSS_SELECTOR);
    memory
        .write_obj(low, GuestAddress(tss_slot))
        .map_err(BootError::Write)?;
    memory
        .write_obj(high, GuestAddress(tss_slot + 8))
        .map_err(BootError::Write)
}

/// Number of bytes the GDT occupies (its limit is this minus one).
pub const GDT_BYTES: u16 = 8 * 10;

/// A 16-byte available 64-bit TSS descriptor (type 9, DPL 0, present).
fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let low = (u64::from(limit) & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89u64 << 40)
        | ((u64::from(limit) >> 16 & 0xf) << 48)
        | ((base >> 24 & 0xff) << 56);
    (low, base >> 32)
}

fn write_tss(memory: &GuestMemory) -> Result<(), BootError> {
    // The TSS body stays zero (no ring transitions ever happen); only the
    // I/O bitmap offset at 0x66 and the bitmap itself matter.
    memory
        .write_obj(IOPB_OFFSET as u16, GuestAddress(TSS_ADDR + 0x66))
        .map_err(BootError::Write)?;
    let mut bitmap = vec![0xffu8; IOPB_BYTES as usize + 1];
    for &(first, last) in GUEST_PORTS {
        for port in first..=last {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    memory
        .write_slice(&bitmap, GuestAddress(TSS_ADDR + IOPB_OFFSET))
        .map_err(BootError::Write)
}

/// Identity-maps [0, end) with 2 MiB pages, Present | RW | User.
fn write_page_tables(memory: &GuestMemory, end: u64) -> Result<(), BootError> {
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    let gibs = end.div_ceil(1 << 30);
    memory
        .write_obj(PDPT_ADDR | PRESENT_RW_USER, GuestAddress(PML4_ADDR))
        .map_err(BootError::Write)?;
    for gib in 0..gibs {
        let pd = PD_ADDR + gib * 0x1000;
        memory
            .write_obj(pd | PRESENT_RW_USER, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(BootError::Write)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((gib << 30) + (i << 21)) | PRESENT_RW_USER | HUGE).to_le_bytes())
            .collect();
        memory
            .write_slice(&entries, GuestAddress(pd))
            .map_err(BootError::Write)?;
    }
    Ok(())
}

fn write_start_info(memory: &GuestMemory, mem_bytes: u64, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    memory
        .write_slice(&line, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::Write)?;

    let ranges = ram_ranges(mem_bytes);
    for (i, (start, len)) in ranges.iter().enumerate() {
        let mut entry = Vec::with_capacity(24);
        entry.extend_from_slice(&start.0.to_le_bytes());
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&E820_RAM.to_le_bytes());
        entry.extend_from_slice(&0u32.to_le_bytes());
        memory
            .write_slice(&entry, GuestAddress(MEMMAP_ADDR + i as u64 * 24))
            .map_err(BootError::Write)?;
    }

    // struct hvm_start_info, version 1.
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    memory
        .write_slice(&info, GuestAddress(START_INFO_ADDR))
        .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let (low, high) = tss_descriptor(0x1234_5678_9abc_def0, 0x2068);
        assert_eq!(low & 0xffff, 0x2068);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!((low >> 56) & 0xff, 0x9a);
        assert_eq!(high, 0x1234_5678);
    }

    #[test]
    fn io_bitmap_opens_only_guest_ports() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        write_tss(ram.memory()).unwrap();
        let bit = |port: u16| -> bool {
            let byte: u8 = ram
                .memory()
                .read_obj(GuestAddress(TSS_ADDR + IOPB_OFFSET + u64::from(port / 8)))
                .unwrap();
            byte & (1 << (port % 8)) != 0
        };
        assert!(!bit(0x3f8) && !bit(0x3fd) && !bit(0x501) && !bit(0x61));
        assert!(bit(0x3f7) && bit(0x400) && bit(0x80) && bit(0xcf8));
    }

    #[test]
    fn page_tables_identity_map_with_user_bit() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        write_page_tables(ram.memory(), 2 << 30).unwrap();
        let pde: u64 = ram
            .memory()
            .read_obj(GuestAddress(PD_ADDR + 0x1000 + 8 * 3))
            .unwrap();
        assert_eq!(pde, ((1 << 30) + (3 << 21)) | 0x87);
    }

    #[test]
    fn garbage_is_not_an_elf() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let image = GuestImage::Bytes(std::borrow::Cow::Owned(vec![0x42; 4096]));
        let err = load(ram.memory(), 4 << 20, &image, "").unwrap_err();
        assert!(matches!(err, BootError::NotElf { .. }), "{err}");
    }
}
