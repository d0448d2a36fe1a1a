//! The guest's disk workload (README, "Disk"): a virtio-blk device over
//! virtio-mmio, found by scanning the slots, driven by polling from vCPU 0
//! (no interrupts), with one request in flight at a time.
//!
//! * `block`: what a block holds and how a block read back is judged
//! * `transport`: the MMIO transport with EVENT_IDX hidden
//!
//! The workload goes round the first MB MiB of the disk block by block.
//! A block this boot has not written yet is written with generation 1; a
//! block it has written is read back, checked against the generation
//! whose write the device acknowledged last, and written again with the
//! next one. The table of acknowledged generations lives in guest RAM
//! (.bss): it travels with memory when the VM migrates, and a freshly
//! booted guest starts from an empty table, so whatever an earlier run
//! left on the disk is overwritten before it is ever checked.
//!
//! Every register access is a VM exit, so a request costs the guest one
//! at most (QueueNotify, only when the device asks for notifications);
//! completions are found in the used ring (a memory read).

mod block;
mod transport;

use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};

use crate::cmdline::{DiskConfig, DiskRate, DISK_MAX_MIB};
use crate::console::Line;
use crate::sync::Exclusive;
use crate::time::{StallClock, Tsc};
use crate::virtio::discover;
use crate::virtio::hal::IdentityHal;
use block::{Block, Verdict, BLOCK_SIZE};
use transport::BlkTransport;

/// Blocks in the largest disk workload.
const MAX_BLOCKS: usize = (DISK_MAX_MIB as usize) << 20 >> 12;
const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;
/// A FLUSH after this long with acknowledged writes not yet flushed.
const FLUSH_PERIOD_MS: u64 = 1000;
/// Most time the pacing may fall behind before it stops catching up (a
/// vCPU that was stopped does not sprint).
const MAX_BEHIND_MS: u64 = 10;
/// DERR lines printed at most; `disk_err` keeps counting.
const ERR_LINES_MAX: u32 = 16;

type Driver = VirtIOBlk<IdentityHal, BlkTransport>;

/// What the heartbeat reports about the disk, totals since boot.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    /// Block writes the device acknowledged (status OK).
    pub wr: u64,
    /// Blocks read back and checked.
    pub ver: u64,
    /// Blocks that failed the check, and requests that failed.
    pub err: u64,
    /// Requests submitted and not yet completed (0 or 1).
    pub inflight: u64,
    /// Highest generation written.
    pub gen: u64,
    /// FLUSH requests completed.
    pub flushes: u64,
}

/// What went wrong bringing the disk up (an EXIT reason).
pub enum InitError {
    NotFound { transports: u32 },
    Transport(virtio_drivers::transport::mmio::MmioError),
    Driver(virtio_drivers::Error),
    TooSmall { sectors: u64, mib: u64 },
    ReadOnly,
    AlreadyUp,
}

impl InitError {
    /// Appends the reason to an EXIT line.
    pub fn describe(&self, l: &mut Line) {
        use core::fmt::Write;
        let _ = match self {
            InitError::NotFound { transports } => write!(
                l,
                "disk= given but no virtio-blk device in the {} virtio-mmio slots at {:#x} ({} transports answered)",
                discover::SLOTS,
                discover::SLOTS_BASE,
                transports
            ),
            InitError::Transport(e) => write!(l, "virtio-blk: bad virtio-mmio transport: {e}"),
            InitError::Driver(e) => write!(l, "virtio-blk: device initialisation failed: {e}"),
            InitError::TooSmall { sectors, mib } => write!(
                l,
                "virtio-blk: the disk has {sectors} sectors, fewer than the {mib} MiB disk= asks for"
            ),
            InitError::ReadOnly => write!(l, "virtio-blk: the disk is read-only; disk= writes"),
            InitError::AlreadyUp => write!(l, "disk: brought up twice"),
        };
    }
}

/// The request in flight, and what it is for.
#[derive(Clone, Copy)]
enum Pending {
    Read { block: u64 },
    Write { block: u64, gen: u32 },
}

/// The data buffer and the table, in .bss.
pub struct Buffers {
    data: Block,
    /// The last generation the device acknowledged per block (0: not
    /// written since boot).
    acked: [u32; MAX_BLOCKS],
}

static BUFFERS: Exclusive<Buffers> = Exclusive::new(Buffers {
    data: Block([0; BLOCK_SIZE]),
    acked: [0; MAX_BLOCKS],
});

static DISK: Exclusive<Option<Disk>> = Exclusive::new(None);

pub struct Disk {
    driver: Driver,
    bufs: &'static mut Buffers,
    /// The request header and status byte of the request in flight (the
    /// device sees them where the Disk lives: in DISK, never moved).
    req: BlkReq,
    resp: BlkResp,
    blocks: u64,
    /// Next block to go round to.
    cursor: u64,
    pending: Option<(Pending, u16)>,
    flush: bool,
    /// TSC ticks between two block rewrites (0: unpaced), and when the
    /// next is due.
    interval: u64,
    next_due: u64,
    max_behind: u64,
    flush_period: u64,
    last_flush: u64,
    unflushed: bool,
    err_lines: u32,
    counters: Counters,
}

impl Disk {
    /// Finds the disk, brings it up, checks it is large enough and
    /// writable, and prints the DISK line.
    pub fn init(cfg: &DiskConfig, tsc: Tsc, now: u64) -> Result<&'static mut Disk, InitError> {
        let slot = DISK.take().ok_or(InitError::AlreadyUp)?;
        let found = discover::find(discover::DEVICE_ID_BLOCK).map_err(|e| InitError::NotFound {
            transports: e.transports,
        })?;
        let header = core::ptr::NonNull::new(found.addr as *mut VirtIOHeader)
            .unwrap_or_else(|| unreachable!());
        // SAFETY: a virtio-mmio register block and config space of
        // SLOT_SIZE bytes sit at found.addr (the scan read its magic
        // value), identity-mapped for the whole run; nothing else in the
        // guest touches them.
        let transport = unsafe { MmioTransport::new(header, discover::SLOT_SIZE) }
            .map_err(InitError::Transport)?;
        let version = transport.version();
        let mut driver = Driver::new(BlkTransport::new(transport)).map_err(InitError::Driver)?;
        // The guest polls the used ring; it never takes an interrupt.
        driver.disable_interrupts();
        driver.ack_interrupt();
        let sectors = driver.capacity();
        if sectors < cfg.mib << 11 {
            return Err(InitError::TooSmall {
                sectors,
                mib: cfg.mib,
            });
        }
        if driver.readonly() {
            return Err(InitError::ReadOnly);
        }
        let bufs = BUFFERS.take().ok_or(InitError::AlreadyUp)?;
        let flush = transport::flush_offered();
        let interval = match cfg.rate {
            DiskRate::Max => 0,
            DiskRate::BlocksPerSec(r) => (tsc.hz() / r).max(1),
        };
        let mut line = Line::new("DISK");
        line.field("slot", u64::from(found.slot))
            .hex_field("addr", found.addr)
            .field(
                "version",
                match version {
                    MmioVersion::Legacy => 1,
                    MmioVersion::Modern => 2,
                },
            )
            .field("capacity_sectors", sectors)
            .field("mb", cfg.mib);
        match cfg.rate {
            DiskRate::Max => line.text(" rate=max"),
            DiskRate::BlocksPerSec(r) => line.field("rate", r),
        };
        line.field("flush", u64::from(flush))
            .field("scan_reads", u64::from(found.reads))
            .field("scan_us", tsc.to_us(found.ticks))
            .send();
        Ok(slot.insert(Disk {
            driver,
            bufs,
            req: BlkReq::default(),
            resp: BlkResp::default(),
            blocks: cfg.mib << 8,
            cursor: 0,
            pending: None,
            flush,
            interval,
            next_due: now,
            max_behind: tsc.ticks_from_ms(MAX_BEHIND_MS),
            flush_period: tsc.ticks_from_ms(FLUSH_PERIOD_MS),
            last_flush: now,
            unflushed: false,
            err_lines: 0,
            counters: Counters::default(),
        }))
    }

    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.inflight = u64::from(self.pending.is_some());
        c
    }

    /// Completes the request in flight if the device has, and starts the
    /// next one when it is due; `now` is the TSC the caller just read.
    pub fn poll(&mut self, now: u64, clock: &mut StallClock) {
        if let Some((pending, token)) = self.pending {
            // A memory read: no exit while the device works.
            if self.driver.peek_used() != Some(token) {
                return;
            }
            self.pending = None;
            self.complete(pending, token, clock);
            if self.pending.is_some() {
                return;
            }
        }
        if self.flush && self.unflushed && now.wrapping_sub(self.last_flush) >= self.flush_period {
            // The driver waits for a FLUSH in place (its request type is
            // not public for a non-blocking one); once a second, with
            // nothing else in flight.
            match self.driver.flush() {
                Ok(()) => self.counters.flushes += 1,
                Err(_) => self.counters.err += 1,
            }
            self.unflushed = false;
            self.last_flush = clock.look();
        }
        if self.interval != 0 {
            // A TSC that went backwards (another host's) wraps: start now.
            if now.wrapping_sub(self.next_due) > u64::MAX / 2 {
                if self.next_due.wrapping_sub(now) > self.interval {
                    self.next_due = now;
                }
                return;
            }
            self.next_due = self.next_due.wrapping_add(self.interval);
            if now.wrapping_sub(self.next_due) < u64::MAX / 2
                && now - self.next_due > self.max_behind
            {
                self.next_due = now;
            }
        }
        let block = self.cursor;
        self.cursor = (self.cursor + 1) % self.blocks;
        match self.bufs.acked[block as usize] {
            0 => self.start_write(block, 1),
            _ => self.start_read(block),
        }
        clock.look();
    }

    fn complete(&mut self, pending: Pending, token: u16, clock: &mut StallClock) {
        let bufs = &mut *self.bufs;
        match pending {
            Pending::Read { block } => {
                // SAFETY: the same buffers read_blocks_nb got with this
                // token; the device has put it in the used ring.
                let done = unsafe {
                    self.driver.complete_read_blocks(
                        token,
                        &self.req,
                        &mut bufs.data.0,
                        &mut self.resp,
                    )
                };
                let want = bufs.acked[block as usize];
                if done.is_err() {
                    self.counters.err += 1;
                    self.report(block, want, "ioerr", 0, clock);
                } else {
                    self.counters.ver += 1;
                    let verdict = block::check(&self.bufs.data, block, u64::from(want));
                    if verdict != Verdict::Good {
                        self.counters.err += 1;
                        let found = match verdict {
                            Verdict::Stale { found_gen } => found_gen,
                            Verdict::Misplaced { found_block } => found_block,
                            _ => 0,
                        };
                        self.report(block, want, verdict.kind(), found, clock);
                    }
                }
                // Rewritten whatever the check said: the next round checks
                // the block again.
                self.start_write(block, want.wrapping_add(1).max(1));
            }
            Pending::Write { block, gen } => {
                // SAFETY: as above, for write_blocks_nb.
                let done = unsafe {
                    self.driver.complete_write_blocks(
                        token,
                        &self.req,
                        &bufs.data.0,
                        &mut self.resp,
                    )
                };
                match done {
                    Ok(()) if self.resp.status() == RespStatus::OK => {
                        bufs.acked[block as usize] = gen;
                        self.counters.wr += 1;
                        self.counters.gen = self.counters.gen.max(u64::from(gen));
                        self.unflushed = true;
                    }
                    _ => {
                        // What the disk holds is unknown now: the block is
                        // written afresh (generation 1) before it is
                        // checked again.
                        bufs.acked[block as usize] = 0;
                        self.counters.err += 1;
                        self.report(block, gen, "write-failed", 0, clock);
                    }
                }
            }
        }
    }

    fn start_read(&mut self, block: u64) {
        let bufs = &mut *self.bufs;
        // SAFETY: the buffers are ours alone and untouched until the
        // device hands this token back (complete() takes them then).
        let token = unsafe {
            self.driver.read_blocks_nb(
                (block * SECTORS_PER_BLOCK) as usize,
                &mut self.req,
                &mut bufs.data.0,
                &mut self.resp,
            )
        };
        match token {
            Ok(token) => self.pending = Some((Pending::Read { block }, token)),
            Err(_) => self.counters.err += 1,
        }
    }

    fn start_write(&mut self, block: u64, gen: u32) {
        let bufs = &mut *self.bufs;
        block::fill(&mut bufs.data, block, u64::from(gen));
        // SAFETY: as for start_read.
        let token = unsafe {
            self.driver.write_blocks_nb(
                (block * SECTORS_PER_BLOCK) as usize,
                &mut self.req,
                &bufs.data.0,
                &mut self.resp,
            )
        };
        match token {
            Ok(token) => self.pending = Some((Pending::Write { block, gen }, token)),
            Err(_) => self.counters.err += 1,
        }
    }

    /// A DERR line for the first few failures.
    fn report(&mut self, block: u64, want: u32, kind: &str, found: u64, clock: &mut StallClock) {
        if self.err_lines >= ERR_LINES_MAX {
            return;
        }
        self.err_lines += 1;
        Line::new("DERR")
            .field("block", block)
            .field("want_gen", u64::from(want))
            .text(" kind=")
            .text(kind)
            .field("found", found)
            .send_watched(clock);
    }
}
