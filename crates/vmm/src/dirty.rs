//! Dirty page tracking: KVM's dirty log for what vCPUs write, OR-ed with
//! vm-memory's bitmap for what the VMM itself writes into guest memory.
//! A harvest returns every page written since the previous harvest and
//! re-arms tracking; a page is never reported clean while it was written.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::memory::{GuestRam, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("turning dirty logging {on} for memory slot {slot} failed: {source}", on = if *.on { "on" } else { "off" })]
    SetLogging {
        slot: u32,
        on: bool,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG for memory slot {slot} failed: {source}")]
    GetLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG for memory slot {slot} at page {first_page} failed: {source}")]
    ClearLog {
        slot: u32,
        first_page: u64,
        source: std::io::Error,
    },
}

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages re-protected per KVM_CLEAR_DIRTY_LOG call. Each call holds KVM's
/// MMU lock only for its own pages, so a vCPU that faults on a protected
/// page waits for one small chunk, not for the whole harvest: that wait is
/// a stall the guest sees (~4 ms per harvest of a 256 MiB working set when
/// KVM_GET_DIRTY_LOG re-protects everything at once).
const CLEAR_CHUNK_PAGES: u64 = 512;

/// Asks KVM to leave re-protection to us (KVM_CLEAR_DIRTY_LOG, done in
/// small chunks by [`harvest`]); false where KVM cannot, and the harvest
/// then falls back to KVM_GET_DIRTY_LOG re-protecting all at once.
pub fn enable_manual_protect(vm_fd: &VmFd) -> bool {
    if vm_fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) <= 0 {
        return false;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm_fd.enable_cap(&cap).is_ok()
}

/// Pages written in one region since the last harvest, one bit per page.
#[derive(Debug, Clone)]
pub struct RegionDirty {
    pub base: u64,
    pub pages: u64,
    pub bits: Vec<u64>,
}

/// The result of one harvest, over all of guest RAM.
#[derive(Debug, Clone, Default)]
pub struct DirtyPages {
    pub regions: Vec<RegionDirty>,
}

impl DirtyPages {
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|r| {
            r.bits.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    Some(r.base + (w as u64 * 64 + b) * PAGE_SIZE)
                })
            })
        })
    }
}

/// Turns KVM's dirty logging on or off for every RAM slot. Turning it on
/// write-protects guest memory, so the first write to each page afterwards
/// is reported.
pub fn set_logging(vm_fd: &VmFd, ram: &GuestRam, on: bool) -> Result<(), DirtyError> {
    for (slot, (guest, len, host)) in ram.regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: guest.0,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: the same slot, address and mapping as registered when the
        // VM was built (owned by `ram`, alive as long as the VM); only the
        // flags change.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(|source| {
            DirtyError::SetLogging {
                slot: slot as u32,
                on,
                source,
            }
        })?;
    }
    Ok(())
}

/// Collects and clears what was written since the last harvest. With
/// `manual` protection, every page reported is write-protected again
/// before this returns, so a write after it is caught by the next harvest.
pub fn harvest(vm_fd: &VmFd, ram: &GuestRam, manual: bool) -> Result<DirtyPages, DirtyError> {
    let mut regions = Vec::new();
    for (slot, region) in ram.memory().iter().enumerate() {
        let len = region.len();
        let mut bits = vm_fd
            .get_dirty_log(slot as u32, len as usize)
            .map_err(|source| DirtyError::GetLog {
                slot: slot as u32,
                source,
            })?;
        if manual {
            clear_in_chunks(vm_fd, slot as u32, len / PAGE_SIZE, &mut bits)?;
        }
        let own = region.get_mmap().bitmap().get_and_reset();
        for (word, own_word) in bits.iter_mut().zip(own) {
            *word |= own_word;
        }
        regions.push(RegionDirty {
            base: region.start_addr().0,
            pages: len / PAGE_SIZE,
            bits,
        });
    }
    Ok(DirtyPages { regions })
}

/// Re-protects the pages set in `bits` (and clears their bits in KVM's
/// log), chunk by chunk, skipping chunks with nothing dirty.
fn clear_in_chunks(
    vm_fd: &VmFd,
    slot: u32,
    pages: u64,
    bits: &mut [u64],
) -> Result<(), DirtyError> {
    let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
    for (chunk, words) in bits.chunks_mut(words_per_chunk).enumerate() {
        if words.iter().all(|&w| w == 0) {
            continue;
        }
        let first_page = chunk as u64 * CLEAR_CHUNK_PAGES;
        let num_pages = CLEAR_CHUNK_PAGES.min(pages - first_page);
        let mut clear = kvm_clear_dirty_log {
            slot,
            num_pages: num_pages as u32,
            first_page,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = words.as_mut_ptr().cast();
        // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which
        // points into `words`: at least ceil(num_pages / 64) live u64s for
        // the duration of the call; first_page is a multiple of 64 and the
        // range lies inside the slot, as KVM requires.
        let ret = unsafe { ioctl_with_ref(vm_fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(DirtyError::ClearLog {
                slot,
                first_page,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_become_addresses() {
        let d = DirtyPages {
            regions: vec![
                RegionDirty {
                    base: 0,
                    pages: 128,
                    bits: vec![0b101, 1 << 63],
                },
                RegionDirty {
                    base: 4 << 30,
                    pages: 64,
                    bits: vec![1 << 1],
                },
            ],
        };
        assert_eq!(d.count(), 4);
        let gpas: Vec<u64> = d.gpas().collect();
        assert_eq!(gpas, vec![0, 2 * 4096, 127 * 4096, (4 << 30) + 4096]);
    }
}
