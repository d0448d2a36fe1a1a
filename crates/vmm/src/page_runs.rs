//! Walks guest memory as runs of non-zero pages, so zero pages (most of a
//! fresh guest) are never written or sent. Callers pause the vCPUs first or
//! track what changes underneath; this module only reads.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemory, PAGE_SIZE};

/// Longest run handed out at once: big enough for large writes, small
/// enough that a reader can bound what it accepts.
pub const MAX_RUN_BYTES: u64 = 4 << 20;

/// One run of consecutive non-zero pages.
pub struct PageRun<'a> {
    pub gpa: u64,
    pub bytes: &'a [u8],
}

pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: u8 has no invalid bit patterns, so viewing it as u128 words
    // (with unaligned head and tail as bytes) is sound.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Calls `f` for every run of non-zero pages, in ascending address order;
/// returns the number of zero pages skipped.
///
/// # Safety
/// Nothing may write guest memory while this runs (the vCPUs are paused and
/// no device is active): the runs are plain slices of the guest's RAM.
pub unsafe fn for_each_nonzero_run<E>(
    memory: &GuestMemory,
    mut f: impl FnMut(PageRun<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut zero_pages = 0;
    for region in memory.iter() {
        let base = region.start_addr().0;
        let len = region.len() as usize;
        // SAFETY: the region's mapping is valid for `len` bytes for as long
        // as `memory` is borrowed, and the caller guarantees no writer.
        let ram = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        let page = PAGE_SIZE as usize;
        let mut run_start: Option<usize> = None;
        let mut offset = 0;
        while offset < len {
            let zero = is_zero_page(&ram[offset..offset + page]);
            if zero {
                zero_pages += 1;
            }
            if let Some(start) = run_start {
                if zero || offset - start >= MAX_RUN_BYTES as usize {
                    f(PageRun {
                        gpa: base + start as u64,
                        bytes: &ram[start..offset],
                    })?;
                    run_start = None;
                }
            }
            if !zero && run_start.is_none() {
                run_start = Some(offset);
            }
            offset += page;
        }
        if let Some(start) = run_start {
            f(PageRun {
                gpa: base + start as u64,
                bytes: &ram[start..len],
            })?;
        }
    }
    Ok(zero_pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn runs_cover_exactly_the_nonzero_pages() {
        let ram = GuestRam::new(16 << 20, false).unwrap();
        let m = ram.memory();
        m.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        m.write_obj(1u8, GuestAddress(0x2fff)).unwrap();
        m.write_obj(1u8, GuestAddress(0x9000)).unwrap();
        // A long run longer than MAX_RUN_BYTES is split.
        m.write_slice(&vec![7u8; 6 << 20], GuestAddress(8 << 20))
            .unwrap();
        let mut runs = Vec::new();
        // SAFETY: nothing else touches this private memory.
        let zeros = unsafe {
            for_each_nonzero_run::<()>(m, |r| {
                runs.push((r.gpa, r.bytes.len() as u64));
                Ok(())
            })
        }
        .unwrap();
        assert_eq!(
            runs,
            vec![
                (0x1000, 0x2000),
                (0x9000, 0x1000),
                (8 << 20, MAX_RUN_BYTES),
                ((8 << 20) + MAX_RUN_BYTES, (6 << 20) - MAX_RUN_BYTES)
            ]
        );
        let total_pages = (16 << 20) / 4096;
        assert_eq!(zeros, total_pages - 3 - (6 << 20) / 4096);
    }
}
