//! Page-aligned buffers and files opened for direct I/O. Snapshot data goes
//! straight between guest RAM (page-aligned) and the disk: on this kind of
//! host the page cache's own first touches cost more than the disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const BLOCK: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// A zeroed, page-aligned byte buffer whose length is a multiple of 4 KiB.
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// At least `len` bytes, rounded up to whole blocks.
    pub fn zeroed(len: usize) -> Self {
        let blocks = vec![Block([0; BLOCK]); len.div_ceil(BLOCK).max(1)];
        let len = blocks.len() * BLOCK;
        Self { blocks, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `blocks` is `len` bytes of plain u8 arrays, contiguous.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.len) }
    }
}

pub fn round_up(len: u64) -> u64 {
    len.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// Opens with O_DIRECT where the file system supports it, else buffered.
pub fn open_direct(path: &Path, options: &mut OpenOptions) -> std::io::Result<(File, bool)> {
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => options.open(path).map(|f| (f, false)),
        Err(e) => Err(e),
    }
}
