//! Where the workload lives and who owns which part of it: the boot plan
//! vCPU 0 publishes. The working set starts at the first 2 MiB boundary
//! after the image (`__image_end`, .bss included); the fill region follows
//! it directly. Both are cut into one contiguous share per vCPU. Pages are
//! numbered from `ws_base` across both regions, so a page that lands in the
//! wrong place never verifies.

use crate::cmdline::{Options, Workload};
use crate::start_info::Ram;
use crate::time::Tsc;

pub const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;
const HUGE_PAGE: u64 = 2 << 20;

extern "C" {
    /// End of the loaded image, .bss included (link.ld).
    static __image_end: u8;
}

/// Everything every vCPU needs to run its share; fixed after boot.
#[derive(Clone, Copy)]
pub struct Plan {
    pub cpus: u32,
    pub tsc: Tsc,
    /// TSC at vCPU 0's entry: `t_ms` counts from here.
    pub boot_tsc: u64,
    pub workload: Workload,
    pub ws_base: u64,
    pub ws_pages: u64,
    pub fill_base: u64,
    pub fill_pages: u64,
}

/// A vCPU's part of a region: pages `[first, first + pages)`, numbered
/// from `ws_base`.
#[derive(Clone, Copy)]
pub struct Share {
    pub first: u64,
    pub pages: u64,
}

/// Why the workload cannot run: it needs `[start, end)` but usable RAM
/// from `start` stops at `ram_end`.
pub struct NoFit {
    pub start: u64,
    pub end: u64,
    pub ram_end: u64,
}

impl Plan {
    /// Lays the workload out after the image and checks that it fits in
    /// one stretch of RAM from the memory map.
    pub fn new(opts: &Options, tsc: Tsc, boot_tsc: u64, ram: &[Ram]) -> Result<Self, NoFit> {
        let (ws_mib, fill_mib) = match opts.workload {
            Workload::Idle => (0, 0),
            Workload::Dirty {
                ws_mib, fill_mib, ..
            } => (ws_mib, fill_mib),
        };
        let ws_base = image_end().next_multiple_of(HUGE_PAGE);
        let fill_base = ws_base + ws_mib * MIB;
        let end = fill_base + fill_mib * MIB;
        let ram_end = ram_end_from(ram, ws_base, end);
        if ram_end < end {
            return Err(NoFit {
                start: ws_base,
                end,
                ram_end,
            });
        }
        Ok(Self {
            cpus: opts.cpus,
            tsc,
            boot_tsc,
            workload: opts.workload,
            ws_base,
            ws_pages: ws_mib * MIB / PAGE_SIZE,
            fill_base,
            fill_pages: fill_mib * MIB / PAGE_SIZE,
        })
    }

    /// vCPU `cpu`'s share of the working set.
    pub fn ws_share(&self, cpu: u32) -> Share {
        split(0, self.ws_pages, self.cpus, cpu)
    }

    /// vCPU `cpu`'s share of the fill region.
    pub fn fill_share(&self, cpu: u32) -> Share {
        split(self.ws_pages, self.fill_pages, self.cpus, cpu)
    }

    /// Guest-physical address of page `index` (numbered from `ws_base`).
    pub fn page_addr(&self, index: u64) -> u64 {
        self.ws_base + index * PAGE_SIZE
    }
}

/// Splits `pages` pages starting at `first` into `cpus` contiguous shares
/// whose sizes differ by at most one page.
fn split(first: u64, pages: u64, cpus: u32, cpu: u32) -> Share {
    let (cpus, cpu) = (u64::from(cpus), u64::from(cpu));
    let base = pages / cpus;
    let extra = pages % cpus;
    Share {
        first: first + cpu * base + cpu.min(extra),
        pages: base + u64::from(cpu < extra),
    }
}

/// How far RAM reaches without a gap from `start`, following ranges that
/// touch or overlap (a memory map may list one stretch in pieces); stops
/// looking once `want` is reached.
fn ram_end_from(ram: &[Ram], start: u64, want: u64) -> u64 {
    // An empty workload fits anywhere.
    if want <= start {
        return want;
    }
    let mut reach = start;
    // Each pass moves `reach` to the end of a range that holds it.
    for _ in 0..ram.len() {
        match ram
            .iter()
            .filter(|r| r.start <= reach && r.end > reach)
            .map(|r| r.end)
            .max()
        {
            Some(end) => reach = end,
            None => break,
        }
        if reach >= want {
            break;
        }
    }
    reach
}

/// End of the loaded image (link.ld's `__image_end`); only its address is
/// taken, never its contents.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}
