//! Time from the TSC: reading it, knowing its frequency (`tsc_khz=` from the
//! VMM, or measured against the PIT under QEMU), and the stall clock that
//! records the longest gap between two looks at the time: the blackout the
//! guest really saw (a migration's downtime, as the guest felt it).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::pio::{inb, outb};

/// Reads the TSC. Native in ring 3 here (~9 ns), no VM exit.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads a counter into EDX:EAX and touches no memory;
    // CR4.TSD is clear, so ring 3 may use it.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The spin-wait hint; the guest has nothing else to wait with.
pub fn pause() {
    core::hint::spin_loop();
}

/// A known TSC frequency and the conversions the guest needs.
#[derive(Clone, Copy)]
pub struct Tsc {
    khz: u64,
}

impl Tsc {
    pub fn new(khz: u64) -> Self {
        Self { khz: khz.max(1) }
    }

    pub fn hz(self) -> u64 {
        self.khz * 1000
    }

    pub fn ticks_from_ms(self, ms: u64) -> u64 {
        ms.saturating_mul(self.khz)
    }

    pub fn ticks_from_us(self, us: u64) -> u64 {
        us.saturating_mul(self.khz) / 1000
    }

    pub fn to_ms(self, ticks: u64) -> u64 {
        ticks / self.khz
    }

    pub fn to_us(self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1000 / u128::from(self.khz)) as u64
    }
}

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 50 ms keeps the error from polling a port (each
/// poll is a VM exit) near 0.05 %.
const WINDOW_MS: u64 = 50;
/// Plausible TSC frequencies; anything else means the PIT did not count.
const MIN_KHZ: u64 = 100_000;
const MAX_KHZ: u64 = 20_000_000;

/// Measures the TSC frequency in kHz against the PIT, or `None` if there is
/// no working PIT. Tries channel 2 (gated through port 0x61), then
/// channel 0 read back with latch commands.
pub fn calibrate() -> Option<u64> {
    let plausible = |khz: u64| (MIN_KHZ..=MAX_KHZ).contains(&khz);
    calibrate_channel2()
        .filter(|&k| plausible(k))
        .or_else(|| calibrate_channel0().filter(|&k| plausible(k)))
}

/// Upper bound on a calibration loop, in TSC ticks: the window at the
/// fastest plausible TSC, times four.
fn deadline_ticks() -> u64 {
    4 * WINDOW_MS * MAX_KHZ
}

/// Channel 2 in mode 0 counts down once from the latch; its output, read
/// at port 0x61 bit 5, goes high at zero.
fn calibrate_channel2() -> Option<u64> {
    let latch = PIT_HZ * WINDOW_MS / 1000;
    let gate = inb(0x61);
    // Gate on (bit 0), speaker off (bit 1).
    outb(0x61, (gate & !0x02) | 0x01);
    // Channel 2, low then high byte, mode 0, binary.
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let start = rdtsc();
    let mut now = start;
    let mut done = false;
    while now.wrapping_sub(start) < deadline_ticks() {
        if inb(0x61) & 0x20 != 0 {
            done = true;
            break;
        }
        now = rdtsc();
    }
    let end = rdtsc();
    outb(0x61, gate);
    done.then(|| (end - start) * PIT_HZ / latch / 1000)
}

/// Channel 0 free-running in mode 2 from 0xffff, read back with the latch
/// command; the ticks it counted over the window give the frequency. For
/// machines whose port 0x61 does not gate channel 2.
fn calibrate_channel0() -> Option<u64> {
    let read = || {
        outb(0x43, 0x00);
        let lo = inb(0x40);
        let hi = inb(0x40);
        u64::from(u16::from_le_bytes([lo, hi]))
    };
    let want = PIT_HZ * WINDOW_MS / 1000;
    // Channel 0, low then high byte, mode 2, binary.
    outb(0x43, 0x34);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let mut prev = read();
    let start = rdtsc();
    let mut ticks = 0;
    while ticks < want {
        if rdtsc().wrapping_sub(start) > deadline_ticks() {
            return None;
        }
        let count = read();
        // Counts down and reloads at 0xffff.
        ticks += if count <= prev {
            prev - count
        } else {
            prev + 0x10000 - count
        };
        prev = count;
    }
    Some((rdtsc() - start) * PIT_HZ / ticks / 1000)
}

/// One vCPU's view of time: every look at the clock goes through here, so
/// the longest gap between two looks is the longest the vCPU did not run
/// (or ran something else than this code).
pub struct StallClock {
    last: u64,
    max_gap: &'static AtomicU64,
}

impl StallClock {
    /// `max_gap` is this vCPU's shared maximum (in TSC ticks), which the
    /// heartbeat swaps back to 0 when it reports it.
    pub fn new(max_gap: &'static AtomicU64) -> Self {
        Self {
            last: rdtsc(),
            max_gap,
        }
    }

    /// Reads the TSC and records the gap since the previous look.
    pub fn look(&mut self) -> u64 {
        let now = rdtsc();
        // A TSC that went backwards (another host's clock) measures nothing.
        let gap = now.saturating_sub(self.last);
        self.last = now;
        // The load keeps the locked read-modify-write off the common path.
        if gap > self.max_gap.load(Ordering::Relaxed) {
            self.max_gap.fetch_max(gap, Ordering::Relaxed);
        }
        now
    }
}
