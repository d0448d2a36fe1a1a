//! The destination's side of copying a local disk (`--copy-storage`): a new
//! image of the VM's size, created here (never over an existing file), its
//! space reserved up front so that a filesystem without room refuses the
//! move before a block arrives (rather than failing a write mid-copy), and
//! mapped so that the migration writes the disk's blocks the way it writes
//! guest memory. Written pages are made durable in the background while
//! the copy runs, so the flush before the commit has only the last blocks
//! left to write. Kept once the VM runs here; deleted when the move
//! does not complete.
//!
//! A receiver killed mid-copy cannot delete its image, so the image is
//! marked incomplete while the copy runs: a file beside it
//! (`IMAGE.incomplete`) on which the receiver holds an OFD lock for as
//! long as it lives. The next copy to that path finds the marker; if it
//! can take the lock, the receiver that made it is dead and its image is
//! only a partial copy (the source ran on), so it is deleted and the copy
//! starts afresh. A marker still locked means a live copy: refused. An
//! image without a marker is nobody's partial copy, and is never touched.
//! The marker goes, durably, once every block is on the storage and before
//! the source is told the state loaded: from then on the image may be the
//! only copy of the VM's disk.

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
use super::lock::{self, LockError};

/// How often written blocks are made durable during the copy.
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
    #[error("a copy into {path} is under way in another live process (its marker {marker} is locked); wait for it to end")]
    InProgress { path: PathBuf, marker: PathBuf },
    #[error("cannot mark the copied disk's image {path} incomplete ({marker}): {source}")]
    Marker {
        path: PathBuf,
        marker: PathBuf,
        source: io::Error,
    },
    #[error("cannot delete the partial image {path} a dead receiver left: {source}")]
    Stale { path: PathBuf, source: io::Error },
}

/// The file that marks `image` as a copy still under way.
pub fn marker_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".incomplete");
    PathBuf::from(name)
}

/// Makes `image`'s marker, locked through the returned file while it is
/// open. Refused if a marker exists already.
fn mark_incomplete(image: &Path) -> Result<File, CopyTargetError> {
    let marker = marker_path(image);
    let failed = |source: io::Error| CopyTargetError::Marker {
        path: image.to_owned(),
        marker: marker.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&marker)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => CopyTargetError::InProgress {
                path: image.to_owned(),
                marker: marker.clone(),
            },
            _ => failed(source),
        })?;
    lock::take(&file, &marker).map_err(|e| match e {
        LockError::Held { .. } => CopyTargetError::InProgress {
            path: image.to_owned(),
            marker: marker.clone(),
        },
        other => failed(io::Error::other(other.to_string())),
    })?;
    use std::io::Write;
    let _ = writeln!(
        file,
        "A disk copy into {} is under way (pid {}); this file goes when it completes.",
        image.display(),
        std::process::id()
    );
    Ok(file)
}

/// Whether what is at `image` is a partial copy a dead receiver left (a
/// copy there would replace it); an error if a live receiver is copying
/// into it now. False when there is no marker.
pub fn left_by_dead_receiver(image: &Path) -> Result<bool, CopyTargetError> {
    let marker = marker_path(image);
    if !marker.exists() {
        return Ok(false);
    }
    match lock::probe(&marker) {
        Ok(lock::LockState::Free) => Ok(true),
        Ok(lock::LockState::Held) => Err(CopyTargetError::InProgress {
            path: image.to_owned(),
            marker,
        }),
        // Gone since: nothing is left.
        Err(LockError::Open { .. }) => Ok(false),
        Err(e) => Err(CopyTargetError::Marker {
            path: image.to_owned(),
            marker,
            source: io::Error::other(e.to_string()),
        }),
    }
}

/// Deletes the image and marker a dead receiver left at `image`; an error
/// if a live one holds the marker. Nothing to do without a marker.
fn clear_stale_copy(image: &Path) -> Result<(), CopyTargetError> {
    let marker = marker_path(image);
    let file = match OpenOptions::new().read(true).write(true).open(&marker) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CopyTargetError::Marker {
                path: image.to_owned(),
                marker,
                source,
            })
        }
    };
    match lock::take(&file, &marker) {
        Ok(()) => {}
        Err(LockError::Held { .. }) => {
            return Err(CopyTargetError::InProgress {
                path: image.to_owned(),
                marker,
            })
        }
        Err(e) => {
            return Err(CopyTargetError::Marker {
                path: image.to_owned(),
                marker,
                source: io::Error::other(e.to_string()),
            })
        }
    }
    // Ours now: the image first, so a crash here leaves a marker that
    // still says what the image (if any) is.
    for p in [image, marker.as_path()] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CopyTargetError::Stale {
                    path: p.to_owned(),
                    source,
                })
            }
        }
    }
    tracing::warn!(
        path = %image.display(),
        "deleted the partial disk image a receiver that died mid-copy left; copying afresh"
    );
    Ok(())
}

/// Removes `image`'s marker and makes the removal durable (the directory
/// synced): a marker that came back after a crash would let a later copy
/// delete a complete image.
fn unmark(image: &Path) -> io::Result<()> {
    std::fs::remove_file(marker_path(image))?;
    let dir = image.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new("."))).and_then(|d| d.sync_all())
}

/// The image a copied disk arrives in.
pub struct CopyTarget {
    path: PathBuf,
    file: File,
    map: NonNull<u8>,
    len: usize,
    kept: bool,
    write_behind: Option<WriteBehind>,
    /// The locked marker, while the copy is incomplete.
    marker: Option<File>,
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
    /// Creates `path` (mode 0600: it will hold the guest's data), marked
    /// incomplete, reserves `bytes` for it and maps it. A partial copy a
    /// dead receiver left there is deleted first. On error nothing of
    /// this copy exists.
    pub fn create(path: &Path, bytes: u64) -> Result<CopyTarget, CopyTargetError> {
        let path = path.to_path_buf();
        if bytes == 0 || bytes % DIRTY_BLOCK != 0 || usize::try_from(bytes).is_err() {
            return Err(CopyTargetError::BadSize { bytes });
        }
        clear_stale_copy(&path)?;
        if path.exists() {
            return Err(CopyTargetError::Exists { path });
        }
        let marker = mark_incomplete(&path)?;
        let unmarked = |e: CopyTargetError| {
            let _ = std::fs::remove_file(marker_path(&path));
            e
        };
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
            })
            .map_err(unmarked)?;
        let removed = |e: CopyTargetError| {
            let _ = std::fs::remove_file(&path);
            unmarked(e)
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
            marker: Some(marker),
        })
    }

    /// Every block is here and on the storage: the image is no longer a
    /// partial copy, and nothing deletes it after a crash. Flushes first.
    pub fn complete(&mut self) -> Result<(), CopyTargetError> {
        self.flush()?;
        if self.marker.is_some() {
            unmark(&self.path).map_err(|source| CopyTargetError::Marker {
                path: self.path.clone(),
                marker: marker_path(&self.path),
                source,
            })?;
            self.marker = None;
        }
        Ok(())
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

    /// The VM runs on the image now: it stays, and the mapping goes. (Its
    /// marker went at [`CopyTarget::complete`]; one still there goes now.)
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        if self.marker.take().is_some() {
            if let Err(e) = unmark(&self.path) {
                tracing::error!(path = %self.path.display(), "cannot remove the copied image's incomplete-marker: remove it by hand, or a later copy there deletes the image: {e}");
            }
        }
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
            // After the image: a marker left alone still explains it.
            if self.marker.take().is_some() {
                let _ = std::fs::remove_file(marker_path(&self.path));
            }
        }
    }
}

/// Every [`WRITE_BEHIND_EVERY`], makes the blocks written since its last
/// look durable, so that the flush in the blackout has only the last ones.
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
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    // A whole fdatasync, not only a push of the data: the
                    // first write into each reserved extent also changes
                    // the file's metadata (the extent becomes written),
                    // and a journal commit of that left for the flush in
                    // the blackout cost it up to 17 ms here.
                    if let Err(e) = file.sync_data() {
                        // The flush before the commit reports real errors.
                        tracing::debug!(path = %path.display(), "write-behind: {e}");
                    }
                    stopped = lock.lock().unwrap();
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
        assert!(!marker_path(&kept).exists());
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
        assert!(!marker_path(&path).exists());
    }

    #[test]
    fn an_unfinished_copy_is_marked_until_complete() {
        let dir = Scratch::new("copy-marked");
        let path = dir.path().join("copied.img");
        let mut t = CopyTarget::create(&path, 64 << 10).unwrap();
        assert!(marker_path(&path).exists());
        // A second copy there while this one lives is refused, and
        // touches neither file.
        let e = CopyTarget::create(&path, 64 << 10).unwrap_err();
        assert!(matches!(e, CopyTargetError::InProgress { .. }), "{e}");
        assert!(path.exists() && marker_path(&path).exists());
        t.as_mut_slice()[0] = 7;
        t.complete().unwrap();
        assert!(!marker_path(&path).exists());
        let kept = t.keep();
        assert_eq!(std::fs::read(&kept).unwrap()[0], 7);
        // A complete image has no marker: never deleted by a later copy.
        let e = CopyTarget::create(&path, 64 << 10).unwrap_err();
        assert!(matches!(e, CopyTargetError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&kept).unwrap()[0], 7);
    }

    #[test]
    fn a_partial_copy_a_dead_receiver_left_is_replaced() {
        let dir = Scratch::new("copy-stale");
        let path = dir.path().join("copied.img");
        // What a receiver killed mid-copy leaves: the image and its marker,
        // whose lock died with it.
        std::fs::write(&path, vec![0xee; 64 << 10]).unwrap();
        std::fs::write(marker_path(&path), b"a dead receiver's").unwrap();
        assert!(left_by_dead_receiver(&path).unwrap());
        let mut t = CopyTarget::create(&path, 64 << 10).unwrap();
        assert!(t.as_mut_slice().iter().all(|&b| b == 0), "a fresh image");
        assert!(marker_path(&path).exists(), "marked again, by this copy");
        assert!(matches!(
            left_by_dead_receiver(&path),
            Err(CopyTargetError::InProgress { .. })
        ));
        drop(t);
        assert!(!path.exists() && !marker_path(&path).exists());
        assert!(!left_by_dead_receiver(&path).unwrap());
        // A marker alone (the receiver died before its image was made).
        std::fs::write(marker_path(&path), b"").unwrap();
        let t = CopyTarget::create(&path, 64 << 10).unwrap();
        drop(t);
        assert!(!marker_path(&path).exists());
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
