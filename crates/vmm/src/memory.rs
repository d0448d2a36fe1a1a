//! Guest RAM: one memfd holding every RAM range, mapped shared into this
//! process. A memfd (rather than anonymous memory) lets the same pages be
//! registered with KVM, handed to another process, and written to a file.
//! Writes the VMM itself makes go through vm-memory and land in its
//! `AtomicBitmap`, beside the dirty log KVM keeps for vCPU writes.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::layout;

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be greater than zero")]
    Zero,
    #[error("guest memory size {0} bytes is not a multiple of 2 MiB")]
    NotAligned(u64),
    #[error("guest memory of {asked_mib} MiB is more than this host can give ({available_mib} MiB available)")]
    HostTooSmall { asked_mib: u64, available_mib: u64 },
    #[error(
        "guest memory of {asked_gib} GiB is more than Ferry's identity map covers ({max_gib} GiB)"
    )]
    TooLarge { asked_gib: u64, max_gib: u64 },
    #[error("cannot read /proc/meminfo to check free memory: {0}")]
    MemInfo(std::io::Error),
    #[error("memfd_create for guest memory failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions overlap or are invalid: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error("preallocating {mib} MiB of guest memory failed: {source}")]
    Prealloc { mib: u64, source: std::io::Error },
}

/// The guest's RAM and the file that backs it.
pub struct GuestRam {
    memory: GuestMemory,
    file: std::sync::Arc<File>,
    size: u64,
}

impl GuestRam {
    /// Checks `size` against the host, then creates and maps it. With
    /// `prealloc` every page is faulted in now, so the guest never pays for a
    /// first touch later (expensive on nested hosts).
    pub fn new(size: u64, prealloc: bool) -> Result<Self, MemoryError> {
        check_size(size, host_available_bytes()?)?;
        let file = std::sync::Arc::new(create_memfd(size)?);
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (start, len) in layout::ram_ranges(size) {
            let bitmap =
                AtomicBitmap::new(len as usize, NonZeroUsize::new(PAGE_SIZE as usize).unwrap());
            let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
            if prealloc {
                flags |= libc::MAP_POPULATE;
            }
            let mapping = MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
                .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(MemoryError::Mmap)?;
            regions.push(
                GuestRegionMmap::new(mapping, start)
                    .expect("ranges come from the layout and cannot overflow"),
            );
            file_offset += len;
        }
        let memory = GuestMemory::from_regions(regions).map_err(MemoryError::Regions)?;
        Ok(Self { memory, file, size })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind every region, at the offsets `regions()` gives.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// (guest address, length, host address) per region, for KVM slots.
    pub fn regions(&self) -> Vec<(GuestAddress, u64, u64)> {
        use vm_memory::GuestMemoryBackend;
        self.memory
            .iter()
            .map(|r| (r.start_addr(), r.len(), r.as_ptr() as u64))
            .collect()
    }
}

/// Refuses sizes the guest cannot use or the host cannot back.
pub fn check_size(size: u64, available: u64) -> Result<(), MemoryError> {
    if size == 0 {
        return Err(MemoryError::Zero);
    }
    if size % (2 << 20) != 0 {
        return Err(MemoryError::NotAligned(size));
    }
    let max = layout::MAX_MAPPED_GIB << 30;
    if layout::ram_end(size) > max {
        return Err(MemoryError::TooLarge {
            asked_gib: size >> 30,
            max_gib: layout::MAX_MAPPED_GIB,
        });
    }
    if size > available {
        return Err(MemoryError::HostTooSmall {
            asked_mib: size >> 20,
            available_mib: available >> 20,
        });
    }
    Ok(())
}

/// What the host can give without swapping: MemAvailable.
pub fn host_available_bytes() -> Result<u64, MemoryError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(MemoryError::MemInfo)?;
    parse_mem_available(&text).ok_or_else(|| {
        MemoryError::MemInfo(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemAvailable line",
        ))
    })
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are
    // valid; the returned descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    debug_assert!(file.as_raw_fd() >= 0);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(check_size(0, 1 << 40), Err(MemoryError::Zero)));
        assert!(matches!(
            check_size(4096, 1 << 40),
            Err(MemoryError::NotAligned(_))
        ));
        assert!(matches!(
            check_size(8 << 30, 4 << 30),
            Err(MemoryError::HostTooSmall { .. })
        ));
        assert!(matches!(
            check_size(1 << 40, 1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(check_size(1 << 30, 4 << 30).is_ok());
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn ram_is_mapped_and_writable() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(4 << 20, false).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert_eq!(ram.regions().len(), 1);
    }
}
