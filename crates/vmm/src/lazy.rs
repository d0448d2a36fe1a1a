//! Guest memory that arrives after the VM starts (post-copy). The pages
//! still to come are dropped from the memfd and the whole mapping is
//! registered with userfaultfd in MISSING mode: whoever touches such a page
//! (a vCPU inside KVM_RUN, or a VMM thread emulating a device) blocks in
//! the kernel until the page is placed atomically with UFFDIO_COPY or
//! UFFDIO_ZEROPAGE. Nothing can read a missing page as zeros, because
//! every access goes through the same mapping.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use userfaultfd::{Event, IoctlFlags, Uffd, UffdBuilder};

use crate::memory::{GuestRam, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("cannot open userfaultfd (post-copy needs root or access to /dev/userfaultfd): {0}")]
    Open(userfaultfd::Error),
    #[error("registering guest memory {gpa:#x}+{len:#x} with userfaultfd failed: {source}")]
    Register {
        gpa: u64,
        len: u64,
        source: userfaultfd::Error,
    },
    #[error("this kernel cannot place pages into shared guest memory with userfaultfd (it offers {0:?})")]
    NoCopy(IoctlFlags),
    #[error("dropping the stale copy of {gpa:#x}+{len:#x} failed: {source}")]
    Discard {
        gpa: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("guest range {gpa:#x}+{len:#x} is not inside one RAM region")]
    NotRam { gpa: u64, len: u64 },
    #[error("placing {len} bytes at guest address {gpa:#x} failed: {source:?}")]
    Place {
        gpa: u64,
        len: u64,
        source: userfaultfd::Error,
    },
    #[error("waiting for page faults failed: {0}")]
    Wait(std::io::Error),
    #[error("reading a page fault from userfaultfd failed: {0}")]
    Read(userfaultfd::Error),
    #[error("unregistering guest memory from userfaultfd failed: {0}")]
    Unregister(userfaultfd::Error),
}

/// One RAM region as the fault handler sees it.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    len: u64,
    host: usize,
}

/// The userfaultfd that stands between the VM and its missing pages.
pub struct LazyRam {
    uffd: Uffd,
    regions: Vec<Region>,
    zeropage: bool,
    /// Keeps every mapping the registration points into alive.
    _ram: GuestRam,
}

impl LazyRam {
    /// Drops the local copy of every range in `missing` (guest address,
    /// length) so that it reads as missing, then registers all of `ram`.
    /// Must be called before any vCPU runs.
    pub fn new(ram: &GuestRam, missing: &[(u64, u64)]) -> Result<Self, LazyError> {
        for &(gpa, len) in missing {
            ram.discard(gpa, len)
                .map_err(|source| LazyError::Discard { gpa, len, source })?;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // Faults taken inside the kernel (KVM reading guest memory for
            // a vCPU) must reach us too.
            .user_mode_only(false)
            .create()
            .map_err(LazyError::Open)?;
        let regions: Vec<Region> = ram
            .regions()
            .into_iter()
            .map(|(gpa, len, host)| Region {
                gpa: gpa.0,
                len,
                host: host as usize,
            })
            .collect();
        let mut zeropage = true;
        for r in &regions {
            let offered = uffd
                .register(r.host as *mut c_void, r.len as usize)
                .map_err(|source| LazyError::Register {
                    gpa: r.gpa,
                    len: r.len,
                    source,
                })?;
            if !offered.contains(IoctlFlags::COPY) {
                return Err(LazyError::NoCopy(offered));
            }
            zeropage &= offered.contains(IoctlFlags::ZEROPAGE);
        }
        Ok(Self {
            uffd,
            regions,
            zeropage,
            _ram: ram.clone(),
        })
    }

    fn host(&self, gpa: u64, len: u64) -> Result<*mut c_void, LazyError> {
        self.regions
            .iter()
            .find_map(|r| {
                let offset = gpa.checked_sub(r.gpa)?;
                (offset.checked_add(len)? <= r.len).then_some((r.host + offset as usize) as _)
            })
            .ok_or(LazyError::NotRam { gpa, len })
    }

    fn gpa_of(&self, host: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let offset = host.checked_sub(r.host)? as u64;
            (offset < r.len).then_some(r.gpa + offset)
        })
    }

    /// Waits up to `timeout` for an access to a missing page; returns the
    /// guest address of that page.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, LazyError> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(LazyError::Wait(e))
            };
        }
        if n == 0 {
            return Ok(None);
        }
        loop {
            match self.uffd.read_event().map_err(LazyError::Read)? {
                None => return Ok(None),
                Some(Event::Pagefault { addr, .. }) => {
                    let page = (addr as usize) & !(PAGE_SIZE as usize - 1);
                    if let Some(gpa) = self.gpa_of(page) {
                        return Ok(Some(gpa));
                    }
                }
                // No other event kind was asked for.
                Some(_) => {}
            }
        }
    }

    /// Places `data` (whole pages) at `gpa` and wakes whoever waits on it.
    /// Pages already present are left as they are: the source's memory is
    /// frozen, so a second copy of a page is the same page. Returns how
    /// many bytes were newly placed.
    pub fn place(&self, gpa: u64, data: &[u8]) -> Result<u64, LazyError> {
        let len = data.len() as u64;
        let dst = self.host(gpa, len)?;
        self.fill(gpa, len, |offset, left| {
            // SAFETY: the destination range lies inside a registered
            // mapping that `_memory` keeps alive (checked by `host`); the
            // source is `data`, borrowed for the whole call. UFFDIO_COPY
            // copies atomically and never writes outside `dst..dst+left`.
            unsafe {
                self.uffd.copy(
                    data.as_ptr().add(offset) as *const c_void,
                    (dst as *mut u8).add(offset) as *mut c_void,
                    left,
                    true,
                )
            }
        })
    }

    /// Places `len` bytes of zero pages at `gpa` (same rules as `place`).
    pub fn place_zero(&self, gpa: u64, len: u64) -> Result<u64, LazyError> {
        let dst = self.host(gpa, len)?;
        if !self.zeropage {
            static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
            let mut placed = 0;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(ZEROS.len() as u64);
                placed += self.place(gpa + at, &ZEROS[..n as usize])?;
                at += n;
            }
            return Ok(placed);
        }
        // One page per call: a zero fill cut short by a present page
        // fails with EAGAIN without saying how far it got, so only single
        // pages keep the count of placed bytes exact. Zero pages are rare
        // in post-copy (most never-written pages are never touched).
        self.fill(gpa, len, |offset, _| {
            // SAFETY: as in `place`: the page is inside a live registered
            // mapping, and UFFDIO_ZEROPAGE touches nothing else.
            unsafe {
                self.uffd.zeropage(
                    (dst as *mut u8).add(offset) as *mut c_void,
                    PAGE_SIZE as usize,
                    true,
                )
            }
        })
    }

    /// Runs one placing ioctl over `len` bytes, stepping over pages that
    /// are already there.
    fn fill(
        &self,
        gpa: u64,
        len: u64,
        mut op: impl FnMut(usize, usize) -> userfaultfd::Result<usize>,
    ) -> Result<u64, LazyError> {
        let mut offset = 0usize;
        let mut placed = 0u64;
        let len = len as usize;
        while offset < len {
            match op(offset, len - offset) {
                Ok(n) => {
                    placed += n as u64;
                    offset += n.max(PAGE_SIZE as usize);
                }
                Err(userfaultfd::Error::PartiallyCopied(n)) => {
                    placed += n as u64;
                    offset += n;
                }
                Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                    if e as i32 == libc::EEXIST =>
                {
                    offset += PAGE_SIZE as usize;
                }
                Err(source) => {
                    return Err(LazyError::Place {
                        gpa: gpa + offset as u64,
                        len: (len - offset) as u64,
                        source,
                    })
                }
            }
        }
        Ok(placed)
    }

    /// Every page is here: stop intercepting accesses.
    pub fn finish(&self) -> Result<(), LazyError> {
        for r in &self.regions {
            self.uffd
                .unregister(r.host as *mut c_void, r.len as usize)
                .map_err(LazyError::Unregister)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_missing_page_waits_until_it_is_placed() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        ram.memory().write_obj(7u64, GuestAddress(0x2000)).unwrap();
        ram.memory().write_obj(9u64, GuestAddress(0x5000)).unwrap();
        // 0x2000 is stale (to come again); 0x5000 stays as it is.
        let lazy = match LazyRam::new(&ram, &[(0x2000, 0x1000)]) {
            Ok(l) => l,
            Err(LazyError::Open(e)) => {
                eprintln!("SKIPPED: userfaultfd unavailable here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let memory = ram.memory().clone();
        let reader = std::thread::spawn(move || {
            let kept: u64 = memory.read_obj(GuestAddress(0x5000)).unwrap();
            let fetched: u64 = memory.read_obj(GuestAddress(0x2008)).unwrap();
            (kept, fetched)
        });
        let fault = loop {
            if let Some(gpa) = lazy.next_fault(Duration::from_secs(5)).unwrap() {
                break gpa;
            }
        };
        assert_eq!(fault, 0x2000);
        let mut page = vec![0u8; 4096];
        page[8] = 42;
        assert_eq!(lazy.place(0x2000, &page).unwrap(), 4096);
        assert_eq!(reader.join().unwrap(), (9, 42));
        // A second copy of a page that is there changes nothing.
        assert_eq!(lazy.place(0x2000, &vec![1u8; 4096]).unwrap(), 0);
        // Zero pages where nothing was ever written; present pages skipped.
        assert_eq!(lazy.place_zero(0x4000, 0x3000).unwrap(), 0x2000);
        let v: u64 = ram.memory().read_obj(GuestAddress(0x2008)).unwrap();
        assert_eq!(v, 42);
        assert!(matches!(
            lazy.place(4 << 20, &page),
            Err(LazyError::NotRam { .. })
        ));
        lazy.finish().unwrap();
    }
}
