//! Where a RAM region sits in this process, and how it is preallocated.
//!
//! Each region is mapped at a 2 MiB aligned address (its memfd offset is
//! 2 MiB aligned too), so the kernel can back it with 2 MiB pages. With
//! `--prealloc` we ask for them: every copy of guest memory (the vCPUs'
//! own accesses, a migration's reads on the source and its writes on the
//! destination) then walks 512 times fewer page-table entries and misses
//! the TLB far less. QEMU gets the same for its anonymous RAM through
//! MADV_HUGEPAGE; shared memory is left out of transparent huge pages by
//! default (`shmem_enabled` = never), and MADV_COLLAPSE is the one request
//! the kernel honours whatever that setting says.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub const HUGE_PAGE: usize = 2 << 20;
const SMALL_PAGE: usize = 4096;

/// How preallocation went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Every 2 MiB of the region is one huge page.
    HugePages,
    /// The kernel refused huge pages (the reason says why); the region is
    /// preallocated in 4 KiB pages, which works, only slower.
    SmallPages { why: String },
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HugePages => f.write_str("in 2 MiB pages"),
            Self::SmallPages { why } => write!(
                f,
                "in 4 KiB pages: the host gave no huge pages ({why}), so the guest and its migration run slower"
            ),
        }
    }
}

/// A shared mapping of part of a file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory: no thread affinity, and what
// the bytes mean is for the users of the pointer to agree on (guest RAM is
// accessed through vm-memory's volatile slices and the vCPUs).
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself never reads or writes the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` at `offset`, read-write and shared, at an
    /// address aligned to 2 MiB.
    pub fn map_shared(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 || offset % HUGE_PAGE as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes at file offset {offset:#x}: must be non-empty and 2 MiB aligned"),
            ));
        }
        let reserve = len + HUGE_PAGE;
        // SAFETY: a fresh anonymous PROT_NONE reservation at an address of
        // the kernel's choosing: it cannot overlap any existing mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let aligned = base.next_multiple_of(HUGE_PAGE);
        // SAFETY: [aligned, aligned + len) lies inside the reservation made
        // above, which nothing else uses, so MAP_FIXED replaces only it.
        let addr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        let mapped = addr != libc::MAP_FAILED;
        let err = io::Error::last_os_error();
        // Give back what the region does not use: the slack before and after
        // it, or the whole reservation if the file could not be mapped.
        let (keep_start, keep_end) = if mapped {
            (aligned, aligned + len)
        } else {
            (base, base)
        };
        release(base, keep_start);
        release(keep_end, base + reserve);
        if !mapped {
            return Err(err);
        }
        Ok(Self {
            addr: aligned as *mut u8,
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Allocates every page now, in 2 MiB pages where the kernel can give
    /// them. Fails only if memory itself cannot be had.
    pub fn preallocate(&self) -> io::Result<Backing> {
        // A hint for hosts whose shmem_enabled is `advise`: the faults below
        // then allocate huge pages directly and the collapse has no work.
        let _ = self.advise(0, self.len, libc::MADV_HUGEPAGE);
        // Collapsing needs a page in each 2 MiB to start from; one small
        // page each keeps what the kernel must copy to almost nothing.
        for at in (0..self.len).step_by(HUGE_PAGE) {
            self.advise(at, SMALL_PAGE, libc::MADV_POPULATE_WRITE)?;
        }
        let backing = match self.advise(0, self.len, libc::MADV_COLLAPSE) {
            Ok(()) => Backing::HugePages,
            Err(e) => Backing::SmallPages {
                why: format!("MADV_COLLAPSE: {e}"),
            },
        };
        // Whatever did not collapse (all of it, on a kernel before 6.1).
        self.advise(0, self.len, libc::MADV_POPULATE_WRITE)?;
        Ok(backing)
    }

    fn advise(&self, at: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        let len = len.min(self.len - at);
        // SAFETY: the range lies inside this mapping, which is ours until
        // drop; these advices only allocate or rearrange its pages and never
        // change what they read as.
        let rc = unsafe { libc::madvise(self.addr.add(at).cast(), len, advice) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Unmaps [start, end) of a reservation `map_shared` made.
fn release(start: usize, end: usize) {
    if end > start {
        // SAFETY: the range is part of our own fresh reservation and holds
        // nothing anyone points into.
        unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping made in `map_shared`; whoever
        // held pointers into it holds the `GuestRam` that owns this
        // `Mapping`, so nothing uses them once it is dropped.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        super::super::create_memfd(len).unwrap()
    }

    #[test]
    fn regions_sit_at_two_mib_boundaries() {
        let file = memfd(8 << 20);
        for offset in [0u64, 2 << 20] {
            let m = Mapping::map_shared(&file, offset, 4 << 20).unwrap();
            assert_eq!(m.as_ptr() as usize % HUGE_PAGE, 0);
        }
        assert!(Mapping::map_shared(&file, 4096, 4 << 20).is_err());
        assert!(Mapping::map_shared(&file, 0, 0).is_err());
    }

    #[test]
    fn memory_too_small_for_a_huge_page_is_preallocated_in_small_ones() {
        let file = memfd(1 << 20);
        let m = Mapping::map_shared(&file, 0, 1 << 20).unwrap();
        let backing = m.preallocate().unwrap();
        assert!(
            matches!(&backing, Backing::SmallPages { why } if why.contains("MADV_COLLAPSE")),
            "{backing:?}"
        );
        assert!(backing.to_string().contains("4 KiB pages"));
        // SAFETY: the mapping is 1 MiB long and only this test uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), 1 << 20) };
        bytes[4097] = 3;
        assert_eq!(bytes[4097], 3);
    }

    #[test]
    fn preallocated_memory_reads_as_zero_and_keeps_writes() {
        let file = memfd(4 << 20);
        let m = Mapping::map_shared(&file, 0, 4 << 20).unwrap();
        let backing = m.preallocate().unwrap();
        // Which backing depends on the host's free huge pages; both must
        // leave the memory usable.
        let _ = backing;
        // SAFETY: the mapping is 4 MiB long and only this test uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), 4 << 20) };
        assert!(bytes.iter().all(|b| *b == 0));
        bytes[(3 << 20) + 5] = 7;
        let again = Mapping::map_shared(&file, 2 << 20, 2 << 20).unwrap();
        // SAFETY: as above, a second view of the same file.
        let view = unsafe { std::slice::from_raw_parts(again.as_ptr(), 2 << 20) };
        assert_eq!(view[(1 << 20) + 5], 7);
    }
}
