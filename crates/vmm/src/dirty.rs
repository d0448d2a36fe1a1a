//! Dirty page tracking: KVM's dirty log for what vCPUs write, OR-ed with
//! vm-memory's bitmap for what the VMM itself writes into guest memory.
//! A harvest returns every page written since the previous harvest and
//! re-arms tracking; a page is never reported clean while it was written.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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

/// Collects and clears what was written since the last harvest.
pub fn harvest(vm_fd: &VmFd, ram: &GuestRam) -> Result<DirtyPages, DirtyError> {
    let mut regions = Vec::new();
    for (slot, region) in ram.memory().iter().enumerate() {
        let len = region.len();
        let mut bits = vm_fd
            .get_dirty_log(slot as u32, len as usize)
            .map_err(|source| DirtyError::GetLog {
                slot: slot as u32,
                source,
            })?;
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
