//! The C memory functions LLVM calls for copies, zeroing and comparisons.
//!
//! On `x86_64-unknown-linux-gnu` these come from libc, which this guest does
//! not link (compiler_builtins leaves them out on this target). Copies and
//! fills use string instructions: a plain Rust loop here could be recognised
//! by LLVM as a memcpy idiom and compiled into a call to itself. The
//! comparisons read through `read_volatile` for the same reason; they only
//! run on short command-line strings.

use core::arch::asm;

/// # Safety
/// `dst` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; DF is clear at
    // every function boundary (ABI), so `rep movsb` copies forwards.
    unsafe {
        asm!(
            "rep movsb",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") n => _,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
/// `dst` and `src` must be valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst below src, or no overlap: a forward copy never reads a byte
        // it has already overwritten.
        // SAFETY: as for memcpy; the ranges may overlap only in the
        // direction a forward copy handles.
        unsafe { memcpy(dst, src, n) }
    } else {
        // dst inside (src, src + n): copy backwards, then restore DF = 0,
        // which the ABI requires everywhere else.
        // SAFETY: the caller guarantees both ranges are valid, n > 0 here.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                inout("rcx") n => _,
                options(nostack)
            );
        }
        dst
    }
}

/// # Safety
/// `dst` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is clear.
    unsafe {
        asm!(
            "rep stosb",
            inout("rdi") dst => _,
            inout("rcx") n => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees n readable bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
