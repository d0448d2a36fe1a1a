//! COM1 output, a whole line at a time.
//!
//! Lines are built on the stack in a [`Line`] and sent under a lock so that
//! lines from different vCPUs never interleave. The formats are the
//! contract in README.md ("Console lines"); the host parses them with
//! `ferry_testguest::console`.
//!
//! Measured here: KVM emulates `rep outsb` one byte per VM exit, exactly
//! like a loop of `out` (~75 us a byte under QEMU, so ~6 ms for a
//! heartbeat line). Lines sent while the workload runs therefore go out a
//! byte at a time with a look at the vCPU's stall clock after each byte
//! ([`Line::send_watched`]): the guest's own output then costs the stall
//! clock one exit, not a whole line, while a real blackout in the middle of
//! a line still shows in full. Lines before the workload starts (and EXIT)
//! use a single `rep outsb`.

use core::fmt;

use crate::pio::{outb, outsb};
use crate::sync::SpinLock;
use crate::time::{pause, StallClock};

const COM1: u16 = 0x3f8;
const EXIT_PORT: u16 = 0x501;
/// Longest line, newline included; longer text is cut (the command line,
/// the longest field, is limited well below this).
const LINE_MAX: usize = 1536;

/// Exit codes written to port 0x501 and printed in `EXIT code=`.
pub mod code {
    pub const BAD_CMDLINE: u8 = 1;
    pub const NO_FIT: u8 = 2;
    pub const PANIC: u8 = 3;
    pub const TOO_MANY_CPUS: u8 = 4;
    pub const BAD_START_INFO: u8 = 5;
    pub const NO_TSC_FREQ: u8 = 6;
    pub const NO_NET: u8 = 7;
    pub const NO_DISK: u8 = 8;
}

/// What a line sent while the workload runs does after each byte: look at
/// the stall clock, and on vCPU 0 also serve the network, whose requests
/// must not wait for a whole line's worth of exits.
pub trait Watch {
    fn watch(&mut self);
}

impl Watch for StallClock {
    fn watch(&mut self) {
        self.look();
    }
}

static LOCK: SpinLock = SpinLock::new();

/// One console line under construction.
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    /// Starts a line with its tag (`HB`, `READY`, ...).
    pub fn new(tag: &str) -> Self {
        let mut line = Self {
            buf: [0; LINE_MAX],
            len: 0,
        };
        line.text(tag);
        line
    }

    /// Appends raw text.
    pub fn text(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends bytes, replacing anything but printable ASCII with `?` so a
    /// line stays one line whatever the input (the command line).
    pub fn printable(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.push(if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
        self
    }

    /// Appends a decimal number.
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in (0..n).rev() {
            self.push(digits[i]);
        }
        self
    }

    /// Appends `0x` and a lowercase hexadecimal number.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        self.text("0x");
        let nibbles = (64 - (v | 1).leading_zeros()).div_ceil(4);
        for i in (0..nibbles).rev() {
            self.push(b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize]);
        }
        self
    }

    /// Appends a MAC address, `xx:xx:xx:xx:xx:xx` in lowercase.
    pub fn mac(&mut self, mac: [u8; 6]) -> &mut Self {
        for (i, b) in mac.iter().enumerate() {
            if i > 0 {
                self.push(b':');
            }
            self.push(b"0123456789abcdef"[usize::from(b >> 4)]);
            self.push(b"0123456789abcdef"[usize::from(b & 0xf)]);
        }
        self
    }

    /// Appends a dotted-quad IPv4 address.
    pub fn ipv4(&mut self, ip: [u8; 4]) -> &mut Self {
        for (i, b) in ip.iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            self.dec(u64::from(*b));
        }
        self
    }

    /// Appends ` key=<decimal>`.
    pub fn field(&mut self, key: &str, v: u64) -> &mut Self {
        self.text(" ").text(key).text("=").dec(v)
    }

    /// Appends ` key=0x<hex>`.
    pub fn hex_field(&mut self, key: &str, v: u64) -> &mut Self {
        self.text(" ").text(key).text("=").hex(v)
    }

    /// Ends the line and sends it with one `rep outsb`.
    pub fn send(&mut self) {
        let _guard = LOCK.lock();
        outsb(COM1, self.finish());
    }

    /// Ends the line and sends it a byte at a time, watching (the stall
    /// clock, and the network on vCPU 0) after each byte (see the module
    /// documentation for why).
    pub fn send_watched(&mut self, watch: &mut impl Watch) {
        let _guard = LOCK.lock();
        watch.watch();
        for &b in self.finish() {
            outb(COM1, b);
            watch.watch();
        }
    }

    /// Appends the newline and returns the whole line.
    fn finish(&mut self) -> &[u8] {
        // push() keeps the last byte free, so the newline always fits.
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.push(b);
        }
        self
    }

    fn push(&mut self, b: u8) {
        if self.len < LINE_MAX - 1 {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.printable(s.as_bytes());
        Ok(())
    }
}

/// Prints `EXIT code=<code> reason=<what reason appends>`, writes the code
/// to port 0x501 (Ferry stops the VM; QEMU's isa-debug-exit too) and
/// spins, in case nothing listens on that port.
pub fn exit(code: u8, reason: impl FnOnce(&mut Line)) -> ! {
    let mut line = Line::new("EXIT");
    line.field("code", u64::from(code)).text(" reason=");
    reason(&mut line);
    line.send();
    stop(code)
}

/// The panic path: like [`exit`], but it does not wait forever for the
/// console lock, which the panicking vCPU may hold itself.
pub fn exit_forced(code: u8, reason: impl FnOnce(&mut Line)) -> ! {
    let mut line = Line::new("EXIT");
    line.field("code", u64::from(code)).text(" reason=");
    reason(&mut line);
    {
        let _guard = LOCK.lock_or_force(10_000_000);
        outsb(COM1, line.finish());
    }
    stop(code)
}

fn stop(code: u8) -> ! {
    outb(EXIT_PORT, code);
    loop {
        pause();
    }
}
