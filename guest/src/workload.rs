//! The work each vCPU does on its shares (README, "Workload").
//!
//! Every 8-byte word `j` of page `i` (numbered from `ws_base`) in
//! generation `g` holds `page_value(i, g) ^ (j * K)`. The initial fill
//! writes generation 1 into the working set and [`FILL_GEN`] into the fill
//! region. Each rewrite of a working-set page first checks that it holds
//! the generation this vCPU's write counter says it must hold (memory is
//! never asked), then writes the next one. Fill pages are re-verified in
//! slices: whenever the rate limit leaves a writer idle, and at least
//! [`FILL_PAGES_PER_PERIOD`] per heartbeat period regardless.
//!
//! The clock is looked at before every slice of at most [`SLICE`] pages,
//! so the stall clock resolves gaps down to a few microseconds.

use crate::blk::Disk;
use crate::cmdline::{Rate, Workload};
use crate::layout::{Plan, Share, PAGE_SIZE};
use crate::net::Net;
use crate::stats::{report_bad_page, CpuStats, Heartbeat, FILLED, HEARTBEAT_MS, STATS};
use crate::throttle::Bucket;
use crate::time::{pause, StallClock};
use core::sync::atomic::Ordering;

/// Pages handled between two looks at the clock.
const SLICE: u64 = 16;
/// Fill pages each vCPU verifies per heartbeat period at the least.
const FILL_PAGES_PER_PERIOD: u64 = 256;
/// The generation fill pages always hold; working-set generations start
/// at 1, so a fill page never passes for a working-set page.
const FILL_GEN: u64 = 0;
/// Multiplier that makes every word of a page different.
const K: u64 = 0x9e37_79b9_7f4a_7c15;
const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// The first word of page `index` in generation `gen`: splitmix64's
/// finalizer over `(index << 32) ^ gen`, with bit 0 set so that no page
/// content is all zeroes (a lost page reads as zeroes).
pub fn page_value(index: u64, gen: u64) -> u64 {
    let mut z = ((index << 32) ^ gen).wrapping_add(K);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Runs vCPU `cpu`'s workload forever; vCPU 0 also brings `heartbeat` and,
/// with `net=`, the network it serves, and with `disk=`, the disk it drives.
pub fn run(
    cpu: u32,
    plan: &'static Plan,
    heartbeat: Option<Heartbeat>,
    net: Option<&'static mut Net>,
    disk: Option<&'static mut Disk>,
) -> ! {
    let stats = &STATS[cpu as usize];
    let mut worker = Worker {
        cpu,
        plan,
        stats,
        clock: StallClock::new(&stats.max_gap),
        heartbeat,
        net,
        disk,
        ws: plan.ws_share(cpu),
        fill: plan.fill_share(cpu),
        wr: 0,
        ver: 0,
        err: 0,
        ws_writes: 0,
        fill_cursor: 0,
        fill_sweeps: 0,
        fill_owed: 0,
        fill_period_end: 0,
    };
    worker.initial_fill();
    FILLED.fetch_add(1, Ordering::Release);
    match plan.workload {
        Workload::Idle => worker.idle(),
        Workload::Dirty { rate, .. } => worker.dirty(rate),
    }
}

struct Worker {
    cpu: u32,
    plan: &'static Plan,
    stats: &'static CpuStats,
    clock: StallClock,
    heartbeat: Option<Heartbeat>,
    /// vCPU 0 only: served at every look at the clock.
    net: Option<&'static mut Net>,
    /// vCPU 0 only: driven at every look at the clock.
    disk: Option<&'static mut Disk>,
    ws: Share,
    fill: Share,
    wr: u64,
    ver: u64,
    err: u64,
    /// Working-set pages this vCPU has written, initial fill included. The
    /// next page to rewrite is `ws_writes % pages` and it must hold
    /// generation `ws_writes / pages`.
    ws_writes: u64,
    fill_cursor: u64,
    fill_sweeps: u64,
    /// Fill pages still to verify in the current period.
    fill_owed: u64,
    fill_period_end: u64,
}

impl Worker {
    /// Looks at the clock (recording the gap) and lets vCPU 0 serve the
    /// network and report.
    fn look(&mut self) -> u64 {
        let now = self.clock.look();
        if let Some(net) = self.net.as_deref_mut() {
            net.poll(now, &mut self.clock);
        }
        if let Some(disk) = self.disk.as_deref_mut() {
            disk.poll(now, &mut self.clock);
        }
        if let Some(heartbeat) = self.heartbeat.as_mut() {
            let disk = self.disk.as_deref().map(Disk::counters);
            heartbeat.poll(now, &mut self.clock, self.net.as_deref_mut(), disk);
        }
        now
    }

    /// Makes this vCPU's counters visible to vCPU 0.
    fn publish(&self) {
        self.stats.wr.store(self.wr, Ordering::Relaxed);
        self.stats.ver.store(self.ver, Ordering::Relaxed);
        self.stats.err.store(self.err, Ordering::Relaxed);
    }

    /// Writes generation 1 over the working-set share and [`FILL_GEN`] over
    /// the fill share, unthrottled.
    fn initial_fill(&mut self) {
        for (share, gen) in [(self.ws, 1), (self.fill, FILL_GEN)] {
            for k in 0..share.pages {
                if k % SLICE == 0 {
                    self.publish();
                    self.look();
                }
                let index = share.first + k;
                write_page(self.plan.page_addr(index), page_value(index, gen));
                self.wr += 1;
            }
        }
        self.ws_writes = self.ws.pages;
        self.publish();
    }

    fn idle(&mut self) -> ! {
        loop {
            self.look();
            pause();
        }
    }

    fn dirty(&mut self, rate: Rate) -> ! {
        let mut bucket = match rate {
            Rate::Max => None,
            Rate::MibPerSec(r) => Some(Bucket::new(
                r,
                self.plan.cpus,
                self.plan.tsc,
                self.clock.look(),
                SLICE,
            )),
        };
        let period = self.plan.tsc.ticks_from_ms(HEARTBEAT_MS);
        loop {
            let now = self.look();
            if now >= self.fill_period_end || now + period < self.fill_period_end {
                self.fill_owed = FILL_PAGES_PER_PERIOD;
                self.fill_period_end = now + period;
            }
            if self.fill_owed > 0 && self.fill.pages > 0 {
                self.verify_fill_slice();
                continue;
            }
            let pages = match (&mut bucket, self.ws.pages) {
                (_, 0) => 0,
                (None, _) => SLICE,
                (Some(bucket), _) => bucket.take(now, SLICE),
            };
            if pages > 0 {
                self.rewrite(pages);
            } else if self.fill.pages > 0 {
                // Time the rate limit leaves over goes to the fill region.
                self.verify_fill_slice();
            } else {
                pause();
            }
        }
    }

    /// Verifies and rewrites the next `pages` pages of the working-set share.
    fn rewrite(&mut self, pages: u64) {
        let share = self.ws;
        for _ in 0..pages {
            let gen = self.ws_writes / share.pages;
            let k = self.ws_writes % share.pages;
            let index = share.first + k;
            let addr = self.plan.page_addr(index);
            if !verify_and_rewrite(addr, page_value(index, gen), page_value(index, gen + 1)) {
                self.bad_page(addr, gen);
            }
            self.ver += 1;
            self.wr += 1;
            self.ws_writes += 1;
            if k + 1 == share.pages {
                // The initial fill is not a sweep: generation 1 was written
                // without a check.
                self.stats
                    .sweeps
                    .store(self.ws_writes / share.pages - 1, Ordering::Relaxed);
            }
        }
        self.publish();
    }

    /// Verifies the next slice of the fill share.
    fn verify_fill_slice(&mut self) {
        let share = self.fill;
        for _ in 0..SLICE.min(share.pages) {
            let index = share.first + self.fill_cursor;
            let addr = self.plan.page_addr(index);
            if !verify_page(addr, page_value(index, FILL_GEN)) {
                self.bad_page(addr, FILL_GEN);
            }
            self.ver += 1;
            self.fill_owed = self.fill_owed.saturating_sub(1);
            self.fill_cursor += 1;
            if self.fill_cursor == share.pages {
                self.fill_cursor = 0;
                self.fill_sweeps += 1;
                self.stats
                    .fsweeps
                    .store(self.fill_sweeps, Ordering::Relaxed);
            }
        }
        self.publish();
    }

    fn bad_page(&mut self, addr: u64, gen: u64) {
        self.err += 1;
        self.stats.err.store(self.err, Ordering::Relaxed);
        report_bad_page(self.cpu, addr, gen, &mut self.clock);
    }
}

// The page loops below are kept out of line so that the compiler cannot
// carry what it knows about a page from one call to the next: each call
// reads memory afresh. They stay plain loops so that they vectorise.

/// Writes one page with first word `value`.
#[inline(never)]
fn write_page(addr: u64, value: u64) {
    let page = addr as *mut u64;
    for j in 0..WORDS {
        // SAFETY: `addr` is a page of this vCPU's share: inside RAM (the
        // boot plan checked it against the memory map), identity-mapped,
        // and written by no one else.
        unsafe { page.add(j).write(value ^ (j as u64).wrapping_mul(K)) };
    }
}

/// Checks that one page holds first word `value`; true if it does.
#[inline(never)]
fn verify_page(addr: u64, value: u64) -> bool {
    let page = addr as *const u64;
    let mut diff = 0;
    for j in 0..WORDS {
        // SAFETY: as for write_page.
        diff |= unsafe { page.add(j).read() } ^ value ^ (j as u64).wrapping_mul(K);
    }
    diff == 0
}

/// Checks that one page holds `old` and rewrites it with `new` in the same
/// pass; true if the check passed.
#[inline(never)]
fn verify_and_rewrite(addr: u64, old: u64, new: u64) -> bool {
    let page = addr as *mut u64;
    let mut diff = 0;
    for j in 0..WORDS {
        let mask = (j as u64).wrapping_mul(K);
        // SAFETY: as for write_page.
        unsafe {
            diff |= page.add(j).read() ^ old ^ mask;
            page.add(j).write(new ^ mask);
        }
    }
    diff == 0
}
