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

mod mapping;

pub use mapping::Backing;
use mapping::Mapping;

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
    Map(std::io::Error),
    #[error("cannot describe guest memory to vm-memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions overlap or are invalid: {0}")]
    Regions(vm_memory::GuestRegionCollectionError),
    #[error("preallocating {mib} MiB of guest memory failed: {source}")]
    Prealloc { mib: u64, source: std::io::Error },
}

/// The guest's RAM and the file that backs it. A clone maps the same
/// memory (and keeps it mapped).
#[derive(Clone)]
pub struct GuestRam {
    // Declared before `_mappings`: the regions point into them.
    memory: GuestMemory,
    _mappings: std::sync::Arc<Vec<Mapping>>,
    file: std::sync::Arc<File>,
    size: u64,
    backing: Option<Backing>,
}

impl GuestRam {
    /// Checks `size` against the host, then creates and maps it. With
    /// `prealloc` every page is allocated now, in 2 MiB pages where the
    /// host can give them, so the guest never pays for a first touch later
    /// (expensive on nested hosts).
    pub fn new(size: u64, prealloc: bool) -> Result<Self, MemoryError> {
        check_size(size, host_available_bytes()?)?;
        let file = std::sync::Arc::new(create_memfd(size)?);
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        let mut small_pages_why = None;
        let mut file_offset = 0u64;
        for (start, len) in layout::ram_ranges(size) {
            let mapping =
                Mapping::map_shared(&file, file_offset, len as usize).map_err(MemoryError::Map)?;
            if prealloc {
                let got = mapping
                    .preallocate()
                    .map_err(|source| MemoryError::Prealloc {
                        mib: size >> 20,
                        source,
                    })?;
                if let Backing::SmallPages { why } = got {
                    small_pages_why.get_or_insert(why);
                }
            }
            let bitmap =
                AtomicBitmap::new(len as usize, NonZeroUsize::new(PAGE_SIZE as usize).unwrap());
            // SAFETY: `mapping` is a live shared mapping of exactly `len`
            // bytes, and it is kept in `mappings` for as long as the regions
            // built on it (both live in this `GuestRam` and its clones).
            let region = unsafe {
                MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
                    .with_raw_mmap_pointer(mapping.as_ptr())
            }
            .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Mmap)?;
            regions.push(
                GuestRegionMmap::new(region, start)
                    .expect("ranges come from the layout and cannot overflow"),
            );
            mappings.push(mapping);
            file_offset += len;
        }
        let memory = GuestMemory::from_regions(regions).map_err(MemoryError::Regions)?;
        let backing = prealloc.then_some(match small_pages_why {
            Some(why) => Backing::SmallPages { why },
            None => Backing::HugePages,
        });
        Ok(Self {
            memory,
            _mappings: std::sync::Arc::new(mappings),
            file,
            size,
            backing,
        })
    }

    /// " (preallocated in …)" for a start-up line, or nothing.
    pub fn prealloc_note(&self) -> String {
        self.backing
            .as_ref()
            .map(|b| format!(" (preallocated {b})"))
            .unwrap_or_default()
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

    /// Where `len` bytes at guest address `gpa` live in this process, if
    /// they all lie inside one region.
    pub fn host_range(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        use vm_memory::GuestMemoryBackend;
        // Called for every batch a migration copies: no allocation here.
        self.memory.iter().find_map(|r| {
            let offset = gpa.checked_sub(r.start_addr().0)?;
            let end = offset.checked_add(len as u64)?;
            (end <= r.len()).then(|| r.as_ptr().wrapping_add(offset as usize))
        })
    }

    /// Copies guest memory at `gpa` into `dst` while vCPUs may be writing
    /// it: a page rewritten meanwhile may arrive torn, which is why a
    /// migration reads only pages the dirty log will report again if they
    /// change. False if the range is not inside one region.
    pub fn copy_out(&self, gpa: u64, dst: &mut [u8]) -> bool {
        let Some(src) = self.host_range(gpa, dst.len()) else {
            return false;
        };
        // SAFETY: `host_range` checked that the whole range lies inside one
        // mapping that `self` keeps alive; `dst` is a separate Rust buffer,
        // so the two cannot overlap. Concurrent guest writes only change
        // the bytes read, never the validity of either pointer.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// The guest ranges that have ever been written (by the guest, the VMM
    /// or a restore): the memfd allocates a page on its first write, so
    /// every other page still reads as zero and need not be read at all.
    /// (guest address, length), ascending, page aligned.
    pub fn populated(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut file_offset = 0u64;
        for (start, len, _) in self.regions() {
            let end = file_offset + len;
            let mut at = file_offset;
            while at < end {
                let Some(data) = seek(fd, at, libc::SEEK_DATA)? else {
                    break;
                };
                if data >= end {
                    break;
                }
                let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                out.push((start.0 + (data - file_offset), hole - data));
                at = hole;
            }
            file_offset = end;
        }
        Ok(out)
    }

    /// Drops the pages of `len` bytes at `gpa` from the memfd (they read
    /// as never written again): post-copy empties the pages still to come
    /// this way, so that the first access to one is a missing-page fault.
    pub fn discard(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        let offset = self.file_offset(gpa, len).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{gpa:#x}+{len:#x} is not inside one RAM region"),
            )
        })?;
        // SAFETY: fallocate only reads its integer arguments; the memfd
        // stays open for the call and the kernel unmaps the dropped pages
        // from every mapping (KVM's included) before freeing them.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Where `len` bytes at `gpa` lie in the memfd: regions follow each
    /// other in the file in guest-address order.
    fn file_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let mut file_offset = 0;
        for (start, region_len, _) in self.regions() {
            if let Some(offset) = gpa.checked_sub(start.0) {
                if offset.checked_add(len)? <= region_len {
                    return Some(file_offset + offset);
                }
            }
            file_offset += region_len;
        }
        None
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

/// lseek(2) for SEEK_DATA / SEEK_HOLE; None when there is no more data.
fn seek(fd: i32, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek only reads its integer arguments; an invalid descriptor
    // or offset is reported through the return value.
    let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(at as u64))
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

    #[test]
    fn populated_ranges_follow_first_writes() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(8 << 20, false).unwrap();
        assert!(ram.populated().unwrap().is_empty());
        ram.memory().write_obj(1u8, GuestAddress(0x3000)).unwrap();
        ram.memory().write_obj(1u8, GuestAddress(0x5123)).unwrap();
        let got = ram.populated().unwrap();
        // shmem reports data at page granularity (or coarser for huge pages).
        assert!(got.iter().any(|&(a, l)| a <= 0x3000 && 0x3000 < a + l));
        assert!(got.iter().any(|&(a, l)| a <= 0x5000 && 0x5000 < a + l));
        let total: u64 = got.iter().map(|r| r.1).sum();
        assert!(total < 8 << 20, "{got:x?}");
        let mut page = vec![0u8; 4096];
        assert!(ram.copy_out(0x5000, &mut page));
        assert_eq!(page[0x123], 1);
        assert!(!ram.copy_out((8 << 20) - 100, &mut page));
    }
}
