//! The source's side of copying a local disk (`--copy-storage`): the
//! migration reads the image while the VM runs, beside the device, through
//! a duplicate of the device's descriptor (so with the same O_DIRECT
//! choice: no page cache between the two), and harvests the blocks the
//! guest wrote since it last looked.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::copy_hold::{CopyHold, HoldTotals};
use super::dirty::{DirtyBlocks, DIRTY_BLOCK};
use super::image::{Bounce, CacheMode};

thread_local! {
    /// Each reading thread's aligned buffer for O_DIRECT, grown as needed.
    static BOUNCE: RefCell<Option<Bounce>> = const { RefCell::new(None) };
}

/// Reads a running VM's image for the copy.
#[derive(Debug)]
pub struct DiskCopySource {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    dirty: Arc<DirtyBlocks>,
    hold: Arc<CopyHold>,
}

impl DiskCopySource {
    pub(super) fn new(
        file: File,
        path: PathBuf,
        size: u64,
        mode: CacheMode,
        dirty: Arc<DirtyBlocks>,
        hold: Arc<CopyHold>,
    ) -> DiskCopySource {
        DiskCopySource {
            file,
            path,
            size,
            direct: mode == CacheMode::Direct,
            dirty,
            hold,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Copies `dst.len()` bytes at `offset` of the image into `dst`; both
    /// must be whole blocks inside the image.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let len = dst.len() as u64;
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.size);
        if !inside || offset % DIRTY_BLOCK != 0 || len % DIRTY_BLOCK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset:#x} are not whole blocks of the {}-byte image {}",
                    self.size,
                    self.path.display()
                ),
            ));
        }
        if !self.direct {
            return self.file.read_exact_at(dst, offset);
        }
        BOUNCE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|b| b.capacity() < dst.len()) {
                *slot = Some(Bounce::new(dst.len()));
            }
            let bounce = slot.as_mut().expect("just filled");
            let buf = &mut bounce.as_mut_slice()[..dst.len()];
            self.file.read_exact_at(buf, offset)?;
            dst.copy_from_slice(buf);
            Ok(())
        })
    }

    /// The parts of the image that may hold data, as (offset, length) in
    /// whole blocks: holes of a sparse image read as zero and are skipped
    /// by the first pass (the destination's new image starts zeroed).
    pub fn allocated(&self) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
            // SAFETY: lseek on a descriptor this struct owns; it moves only
            // the shared file offset, which every transfer here and in the
            // device ignores (they are positional).
            let at = unsafe { libc::lseek(fd, from as libc::off_t, whence) };
            if at >= 0 {
                return Ok(Some(at as u64));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No data at or after `from`.
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            }
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < self.size {
            let Some(data) = seek(at, libc::SEEK_DATA)? else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE)?
                .unwrap_or(self.size)
                .min(self.size);
            let start = data / DIRTY_BLOCK * DIRTY_BLOCK;
            let end = hole.div_ceil(DIRTY_BLOCK) * DIRTY_BLOCK;
            let end = end.min(self.size.div_ceil(DIRTY_BLOCK) * DIRTY_BLOCK);
            match out.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = end.max(*s + *l) - *s,
                _ => out.push((start, end - start)),
            }
            if hole <= at {
                break;
            }
            at = hole;
        }
        Ok(out)
    }

    /// Starts (with an empty set) or stops recording the guest's writes.
    /// Stopping also ends write-blocking: no copy is left to wait for.
    pub fn set_tracking(&self, on: bool) {
        if on {
            self.hold.stop();
            self.hold.reset_totals();
        } else {
            self.hold.stop();
        }
        self.dirty.set_tracking(on);
    }

    /// Starts write-blocking (see [`super::copy_hold`]) or ends it,
    /// letting every waiting write complete.
    pub fn hold_writes(&self, on: bool) {
        if on {
            self.hold.start(&self.dirty);
        } else {
            self.hold.stop();
        }
    }

    /// The copy sent the round built from the newest harvest.
    pub fn round_sent(&self) {
        self.hold.round_sent(&self.dirty);
    }

    /// What write-blocking did so far.
    pub fn hold_totals(&self) -> HoldTotals {
        self.hold.totals()
    }

    /// The blocks written since the last harvest (see
    /// [`DirtyBlocks::harvest`]).
    pub fn harvest(&self) -> Vec<u64> {
        self.dirty.harvest()
    }

    /// Blocks the set covers.
    pub fn blocks(&self) -> u64 {
        self.dirty.blocks()
    }
}

impl Drop for DiskCopySource {
    /// A copy that is gone sends nothing more: no write may wait for it.
    fn drop(&mut self) {
        self.hold.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::scratch::Scratch;

    fn source_over(path: &Path, size: u64) -> DiskCopySource {
        let file = std::fs::File::open(path).unwrap();
        DiskCopySource::new(
            file,
            path.to_path_buf(),
            size,
            CacheMode::Buffered,
            Arc::new(DirtyBlocks::new(size)),
            Arc::new(CopyHold::default()),
        )
    }

    #[test]
    fn the_first_pass_reads_what_the_image_holds_and_skips_its_holes() {
        let dir = Scratch::new("copy-source-sparse");
        let path = dir.path().join("sparse.img");
        let size = 64 << 20;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        file.write_all_at(&[7u8; 4096], 2 * 4096).unwrap();
        file.write_all_at(&[9u8; 4096], 40 << 20).unwrap();
        file.sync_all().unwrap();
        let source = source_over(&path, size);
        let extents = source.allocated().unwrap();
        let covers = |at: u64| extents.iter().any(|&(s, l)| s <= at && at < s + l);
        assert!(covers(2 * 4096) && covers(40 << 20), "{extents:x?}");
        let listed: u64 = extents.iter().map(|e| e.1).sum();
        assert!(listed < size / 2, "holes were listed: {extents:x?}");
        for &(s, l) in &extents {
            assert!(s % DIRTY_BLOCK == 0 && l % DIRTY_BLOCK == 0 && s + l <= size);
        }
        let mut page = vec![0u8; 8192];
        source.read(4096, &mut page).unwrap();
        assert!(page[..4096].iter().all(|&b| b == 0));
        assert!(page[4096..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_read_outside_the_image_or_not_in_whole_blocks_is_refused() {
        let dir = Scratch::new("copy-source-bounds");
        let path = dir.path().join("small.img");
        std::fs::write(&path, vec![1u8; 16384]).unwrap();
        let source = source_over(&path, 16384);
        let mut buf = vec![0u8; 8192];
        assert!(source.read(12288, &mut buf).is_err());
        assert!(source.read(512, &mut buf[..4096]).is_err());
        assert!(source.read(0, &mut buf[..1024]).is_err());
        source.read(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 1));
    }
}
