//! The destination's side of copying a local disk (`--copy-storage`): a new
//! image of the VM's size, created here (never over an existing file), its
//! space reserved up front so that a filesystem without room refuses the
//! move before a block arrives (rather than failing a write mid-copy), and
//! mapped so that the migration writes the disk's blocks the way it writes
//! guest memory. Written pages are pushed to the storage in the background
//! while the copy runs, so the flush before the commit has only the last
//! blocks left to write. Kept once the VM runs here; deleted when the move
//! does not complete.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dirty::DIRTY_BLOCK;

/// How often written blocks are pushed towards the storage during the copy.
const WRITE_BEHIND_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum CopyTargetError {
    #[error("the copied disk's image {path} exists already: Ferry never writes over a file (remove it, or give --disk another path)")]
    Exists { path: PathBuf },
    #[error("cannot create the copied disk's image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("the filesystem of {path} has no room for the copied disk's {bytes} bytes; nothing was copied")]
    NoSpace { path: PathBuf, bytes: u64 },
    #[error("cannot reserve {bytes} bytes for the copied disk's image {path}: {source}")]
    Reserve {
        path: PathBuf,
        bytes: u64,
        source: io::Error,
    },
    #[error("a copied disk is whole 4 KiB blocks; {bytes} bytes is not")]
    BadSize { bytes: u64 },
    #[error("cannot map the copied disk's image {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("cannot flush the copied disk's image {path}: {source}")]
    Flush { path: PathBuf, source: io::Error },
}

/// The image a copied disk arrives in.
pub struct CopyTarget {
    path: PathBuf,
    file: File,
    map: NonNull<u8>,
    len: usize,
    kept: bool,
    write_behind: Option<WriteBehind>,
}

// SAFETY: the mapping is owned by this value alone (like a Vec's buffer):
// it is reached only through &self / &mut self, and unmapped on drop.
unsafe impl Send for CopyTarget {}

impl std::fmt::Debug for CopyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyTarget")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("kept", &self.kept)
            .finish()
    }
}

impl CopyTarget {
    /// Creates `path` (mode 0600: it will hold the guest's data), reserves
    /// `bytes` for it and maps it. Nothing exists at `path` on error.
    pub fn create(path: &Path, bytes: u64) -> Result<CopyTarget, CopyTargetError> {
        let path = path.to_path_buf();
        if bytes == 0 || bytes % DIRTY_BLOCK != 0 || usize::try_from(bytes).is_err() {
            return Err(CopyTargetError::BadSize { bytes });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => CopyTargetError::Exists { path: path.clone() },
                _ => CopyTargetError::Create {
                    path: path.clone(),
                    source,
                },
            })?;
        let removed = |e: CopyTargetError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        // SAFETY: fallocate on a descriptor we own, inside its size limits.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
        if rc != 0 {
            let source = io::Error::last_os_error();
            return Err(removed(match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => CopyTargetError::NoSpace {
                    path: path.clone(),
                    bytes,
                },
                _ => CopyTargetError::Reserve {
                    path: path.clone(),
                    bytes,
                    source,
                },
            }));
        }
        let len = bytes as usize;
        // SAFETY: a new shared mapping of a file we own, `len` bytes long
        // (the file is at least that since fallocate); no other mapping
        // aliases it in this process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            return Err(removed(CopyTargetError::Map {
                path: path.clone(),
                source,
            }));
        }
        let map = NonNull::new(ptr.cast::<u8>()).expect("mmap succeeded");
        let write_behind = file
            .try_clone()
            .ok()
            .map(|dup| WriteBehind::start(dup, &path));
        Ok(CopyTarget {
            path,
            file,
            map,
            len,
            kept: false,
            write_behind,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole image, for the migration to write blocks into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: map is a live mapping of len bytes owned by self, and
        // &mut self makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.len) }
    }

    /// Every block written so far is on the storage (fdatasync also writes
    /// the pages dirtied through the mapping).
    pub fn flush(&self) -> Result<(), CopyTargetError> {
        self.file
            .sync_data()
            .map_err(|source| CopyTargetError::Flush {
                path: self.path.clone(),
                source,
            })
    }

    /// The VM runs on the image now: it stays, and the mapping goes.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.path.clone()
    }
}

impl Drop for CopyTarget {
    fn drop(&mut self) {
        if let Some(w) = self.write_behind.take() {
            w.stop();
        }
        // SAFETY: map/len are the mapping made in create, unmapped once.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
        if !self.kept {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(), "the move did not complete: the partial copy of the disk was deleted")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "cannot delete the partial copy of the disk: {e}")
                }
            }
        }
    }
}

/// Starts writeback of the blocks written since its last look, without
/// waiting for it, every [`WRITE_BEHIND_EVERY`].
struct WriteBehind {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl WriteBehind {
    fn start(file: File, path: &Path) -> WriteBehind {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("disk-write-behind".into())
            .spawn(move || {
                let (lock, cv) = &*signal;
                let mut stopped = lock.lock().unwrap();
                while !*stopped {
                    stopped = cv.wait_timeout(stopped, WRITE_BEHIND_EVERY).unwrap().0;
                    // SAFETY: sync_file_range on a descriptor this thread
                    // owns; offset 0 and length 0 mean the whole file.
                    let rc = unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                    };
                    if rc != 0 {
                        // The flush before the commit reports real errors.
                        tracing::debug!(path = %path.display(), "write-behind: {}", io::Error::last_os_error());
                    }
                }
            })
            .expect("spawning the disk's write-behind thread");
        WriteBehind { stop, thread }
    }

    fn stop(self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::scratch::Scratch;

    #[test]
    fn a_completed_copy_stays_with_its_data() {
        let dir = Scratch::new("copy-kept");
        let path = dir.path().join("copied.img");
        let mut t = CopyTarget::create(&path, 1 << 20).unwrap();
        assert!(t.as_mut_slice().iter().all(|&b| b == 0));
        t.as_mut_slice()[4096..8192].fill(0xab);
        t.flush().unwrap();
        let kept = t.keep();
        let data = std::fs::read(&kept).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(data[4096..8192].iter().all(|&b| b == 0xab));
        assert!(data[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_unfinished_copy_is_deleted() {
        let dir = Scratch::new("copy-partial");
        let path = dir.path().join("partial.img");
        let mut t = CopyTarget::create(&path, 64 << 10).unwrap();
        t.as_mut_slice()[0] = 1;
        drop(t);
        assert!(!path.exists());
    }

    #[test]
    fn an_existing_file_is_never_written_over() {
        let dir = Scratch::new("copy-exists");
        let path = dir.path().join("there.img");
        std::fs::write(&path, b"keep me").unwrap();
        let e = CopyTarget::create(&path, 64 << 10).unwrap_err();
        assert!(matches!(e, CopyTargetError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn a_size_that_is_not_whole_blocks_is_refused() {
        let dir = Scratch::new("copy-odd");
        let path = dir.path().join("odd.img");
        let e = CopyTarget::create(&path, 4096 + 512).unwrap_err();
        assert!(matches!(e, CopyTargetError::BadSize { .. }), "{e}");
        assert!(!path.exists());
    }
}
