//! The counters every vCPU keeps and vCPU 0 reports: one cache line of
//! atomics per vCPU (written only by its owner, read by vCPU 0, so no line
//! bounces between writers), the READY line once every share is written,
//! the `HB` line every 100 ms, and `ERR` lines for the first bad pages.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::blk;
use crate::cmdline::{Rate, Workload};
use crate::console::Line;
use crate::layout::Plan;
use crate::net::{Net, Serving};
use crate::time::StallClock;
use crate::MAX_CPUS;

/// Heartbeat period.
pub const HEARTBEAT_MS: u64 = 100;
/// ERR lines printed at most; `err` keeps counting after that.
const ERR_LINES_MAX: u32 = 16;

/// One vCPU's counters. Its owner stores them (no read-modify-write, it is
/// the only writer) except `max_gap`, which vCPU 0 swaps back to 0.
#[repr(C, align(64))]
pub struct CpuStats {
    /// Pages written: working set and fill, initial fill included.
    pub wr: AtomicU64,
    /// Pages verified: working set and fill.
    pub ver: AtomicU64,
    /// Pages that failed verification.
    pub err: AtomicU64,
    /// Completed verify-and-rewrite passes over its working-set share.
    pub sweeps: AtomicU64,
    /// Completed verification passes over its fill share.
    pub fsweeps: AtomicU64,
    /// Longest gap between two looks at the clock, in TSC ticks, since
    /// vCPU 0 last reported it.
    pub max_gap: AtomicU64,
}

impl CpuStats {
    const fn new() -> Self {
        Self {
            wr: AtomicU64::new(0),
            ver: AtomicU64::new(0),
            err: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            fsweeps: AtomicU64::new(0),
            max_gap: AtomicU64::new(0),
        }
    }
}

pub static STATS: [CpuStats; MAX_CPUS] = [const { CpuStats::new() }; MAX_CPUS];

/// vCPUs that have written their whole share (working set and fill).
pub static FILLED: AtomicU32 = AtomicU32::new(0);

static ERR_LINES: AtomicU32 = AtomicU32::new(0);

/// Reports a page that failed verification: an ERR line for the first
/// few; the caller counts it in its `err`.
pub fn report_bad_page(cpu: u32, addr: u64, gen: u64, clock: &mut StallClock) {
    if ERR_LINES.fetch_add(1, Ordering::Relaxed) < ERR_LINES_MAX {
        Line::new("ERR")
            .field("cpu", u64::from(cpu))
            .hex_field("addr", addr)
            .field("gen", gen)
            .send_watched(clock);
    }
}

/// Sends a line a byte at a time, serving the network between the bytes
/// when there is one.
fn send(mut line: Line, clock: &mut StallClock, net: Option<&mut Net>) {
    match net {
        Some(net) => line.send_watched(&mut Serving { clock, net }),
        None => line.send_watched(clock),
    }
}

/// vCPU 0's reporter: READY once, then a heartbeat every 100 ms.
pub struct Heartbeat {
    plan: &'static Plan,
    /// TSC when the workload started (init_ms counts from here).
    start: u64,
    period: u64,
    seq: u64,
    next_due: u64,
    last_t: u64,
    last_wr: u64,
    ready_sent: bool,
}

impl Heartbeat {
    /// The first heartbeat (seq 0) is due at once: the host learns as
    /// early as possible that the guest runs.
    pub fn new(plan: &'static Plan, start: u64) -> Self {
        let period = plan.tsc.ticks_from_ms(HEARTBEAT_MS);
        Self {
            plan,
            start,
            period,
            seq: 0,
            next_due: start,
            last_t: start,
            last_wr: 0,
            ready_sent: false,
        }
    }

    /// Called by vCPU 0 after every look at `clock` (which returned `now`);
    /// prints what is due, serving `net` between the bytes; `disk` is the
    /// disk's counters with `disk=`.
    pub fn poll(
        &mut self,
        now: u64,
        clock: &mut StallClock,
        mut net: Option<&mut Net>,
        disk: Option<blk::Counters>,
    ) {
        if !self.ready_sent && FILLED.load(Ordering::Acquire) >= self.plan.cpus {
            self.ready_sent = true;
            let line = self.ready_line(now);
            send(line, clock, net.as_deref_mut());
        }
        // A TSC that jumped backwards (another host's) must not stop the
        // heartbeat: beat now and schedule from here.
        if now < self.next_due && now >= self.last_t {
            return;
        }
        let line = self.heartbeat_line(now, net.as_deref(), disk);
        send(line, clock, net);
        self.next_due += self.period;
        if self.next_due <= now || now < self.last_t {
            self.next_due = now + self.period;
        }
        self.last_t = now;
    }

    fn ready_line(&self, now: u64) -> Line {
        let plan = self.plan;
        let (ws_mb, rate, fill_mb) = match plan.workload {
            Workload::Idle => (0, Some(0), 0),
            Workload::Dirty {
                ws_mib,
                rate,
                fill_mib,
            } => (
                ws_mib,
                if let Rate::MibPerSec(r) = rate {
                    Some(r)
                } else {
                    None
                },
                fill_mib,
            ),
        };
        let mut line = Line::new("READY");
        line.field("ws_mb", ws_mb);
        match rate {
            Some(r) => line.field("rate", r),
            None => line.text(" rate=max"),
        };
        line.field("fill_mb", fill_mb)
            .field("cpus", u64::from(plan.cpus))
            .hex_field("ws_base", plan.ws_base)
            .hex_field("fill_base", plan.fill_base)
            .field("init_ms", plan.tsc.to_ms(now.saturating_sub(self.start)));
        line
    }

    fn heartbeat_line(&mut self, now: u64, net: Option<&Net>, disk: Option<blk::Counters>) -> Line {
        let plan = self.plan;
        let (mut wr, mut ver, mut err, mut gap) = (0u64, 0u64, 0u64, 0u64);
        let (mut sweeps, mut fsweeps) = (u64::MAX, u64::MAX);
        for cpu in 0..plan.cpus {
            let s = &STATS[cpu as usize];
            wr += s.wr.load(Ordering::Relaxed);
            ver += s.ver.load(Ordering::Relaxed);
            err += s.err.load(Ordering::Relaxed);
            gap = gap.max(s.max_gap.swap(0, Ordering::Relaxed));
            // A vCPU with an empty share has nothing to sweep.
            if plan.ws_share(cpu).pages > 0 {
                sweeps = sweeps.min(s.sweeps.load(Ordering::Relaxed));
            }
            if plan.fill_share(cpu).pages > 0 {
                fsweeps = fsweeps.min(s.fsweeps.load(Ordering::Relaxed));
            }
        }
        let sweeps = if sweeps == u64::MAX { 0 } else { sweeps };
        let fsweeps = if fsweeps == u64::MAX { 0 } else { fsweeps };
        // MiB/s = pages * 4096 / 2^20 / seconds = pages * tsc_hz / (256 * ticks)
        // (The first heartbeat comes right at the start: too short a time
        // to say anything about a rate.)
        let dt = now.saturating_sub(self.last_t);
        let rate = if dt < plan.tsc.ticks_from_ms(1) {
            0
        } else {
            u128::from(wr.saturating_sub(self.last_wr)) * u128::from(plan.tsc.hz())
                / (256 * u128::from(dt))
        };
        let mut line = Line::new("HB");
        line.field("seq", self.seq)
            .field("t_ms", plan.tsc.to_ms(now.saturating_sub(plan.boot_tsc)))
            .field("wr", wr)
            .field("ver", ver)
            .field("err", err)
            .field("sweeps", sweeps)
            .field("fsweeps", fsweeps)
            .field("stall_us", plan.tsc.to_us(gap))
            .field("rate_mibs", rate as u64);
        if let Some(net) = net {
            let c = net.counters();
            line.field("net_rx", c.rx)
                .field("net_tx", c.tx)
                .field("tcp_conns", c.tcp_conns)
                .field("tcp_replies", c.tcp_replies)
                .field("udp_echoes", c.udp_echoes)
                .field("net_err", c.err);
        }
        if let Some(d) = disk {
            line.field("disk_wr", d.wr)
                .field("disk_ver", d.ver)
                .field("disk_err", d.err)
                .field("disk_inflight", d.inflight)
                .field("disk_gen", d.gen)
                .field("disk_flushes", d.flushes);
        }
        self.seq += 1;
        self.last_wr = wr;
        line
    }
}
