//! x86 port I/O from ring 3.
//!
//! It works only because the TSS I/O permission bitmap allows the ports
//! (this host ignores IOPL); every access is a VM exit (~25 us on nested
//! PVM), so callers batch: the console sends a whole line with one
//! `rep outsb`.

use core::arch::asm;

/// Writes one byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory; the ports this guest uses are
    // allowed by the TSS bitmap (README, "Ports").
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads one byte from `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes all of `bytes` to `port` with one `rep outsb`: one VM exit.
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads exactly `bytes.len()` bytes from a valid slice; DF is
    // clear at every function boundary (ABI), so it reads forwards.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        );
    }
}
