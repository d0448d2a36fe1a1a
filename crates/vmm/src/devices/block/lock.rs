//! The exclusive lock on a disk image: an open-file-description (OFD)
//! write lock over the whole file (`fcntl(F_OFD_SETLK)`), as QEMU's image
//! locking uses. It belongs to the open file, not to the process, so two
//! opens in one process conflict too, and it goes when the last
//! descriptor of that open is closed (a crashed VMM holds nothing). On
//! shared storage the running host holds it; the migration hands it over
//! at the commit.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("disk image {path} is locked by another process (another VM is using it)")]
    Held { path: PathBuf },
    #[error("cannot lock disk image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot open disk image {path} to look at its lock: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// What [`probe`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    Free,
    /// Someone holds a lock that conflicts with an exclusive one.
    Held,
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = 0, l_len = 0: from the start to the end, however far the
    // file grows. l_pid must be 0 for OFD locks.
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) the flock
    // we pass, which lives across the call; the descriptor is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes the exclusive lock on the whole of `file` (opened from `path`,
/// for messages) without waiting: an error if anyone else holds a lock on
/// it. Taking it again through the same open is harmless.
pub fn take(file: &File, path: &Path) -> Result<(), LockError> {
    let mut fl = whole_file(libc::F_WRLCK);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => LockError::Held {
            path: path.to_owned(),
        },
        _ => LockError::Io {
            path: path.to_owned(),
            source: e,
        },
    })
}

/// Takes a shared (read) lock on the whole of `file`: for an image used
/// read-only, which other readers may share but no writer may hold.
pub fn take_shared(file: &File, path: &Path) -> Result<(), LockError> {
    let mut fl = whole_file(libc::F_RDLCK);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => LockError::Held {
            path: path.to_owned(),
        },
        _ => LockError::Io {
            path: path.to_owned(),
            source: e,
        },
    })
}

/// Gives the lock taken through `file` back (nothing if it held none).
pub fn release(file: &File, path: &Path) -> Result<(), LockError> {
    let mut fl = whole_file(libc::F_UNLCK);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl).map_err(|source| LockError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Whether anyone holds a lock on `path` that an exclusive lock would
/// conflict with: opens the file read-only (its own open holds nothing)
/// and asks with F_OFD_GETLK.
pub fn probe(path: &Path) -> Result<LockState, LockError> {
    let file = File::open(path).map_err(|source| LockError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut fl = whole_file(libc::F_WRLCK);
    fcntl_lock(&file, libc::F_OFD_GETLK, &mut fl).map_err(|source| LockError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(if fl.l_type == libc::F_UNLCK as libc::c_short {
        LockState::Free
    } else {
        LockState::Held
    })
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;
    use crate::devices::block::scratch::Scratch;

    fn image(tag: &str) -> (Scratch, PathBuf) {
        let dir = Scratch::new(tag);
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn one_holder_at_a_time_even_in_one_process() {
        let (_dir, path) = image("lock-one");
        let (a, b) = (open(&path), open(&path));
        assert_eq!(probe(&path).unwrap(), LockState::Free);
        take(&a, &path).unwrap();
        // Again through the same open: still ours.
        take(&a, &path).unwrap();
        assert_eq!(probe(&path).unwrap(), LockState::Held);
        let err = take(&b, &path).unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        assert!(err.to_string().contains("locked by another process"));
        release(&a, &path).unwrap();
        assert_eq!(probe(&path).unwrap(), LockState::Free);
        take(&b, &path).unwrap();
        assert!(matches!(take(&a, &path), Err(LockError::Held { .. })));
        // Closing the holder's file gives the lock back.
        drop(b);
        assert_eq!(probe(&path).unwrap(), LockState::Free);
        take(&a, &path).unwrap();
    }

    #[test]
    fn probing_a_missing_image_says_so() {
        let (dir, _) = image("lock-missing");
        let missing = dir.path().join("nope.img");
        let err = probe(&missing).unwrap_err();
        assert!(matches!(err, LockError::Open { .. }), "{err}");
        assert!(err.to_string().contains("nope.img"));
    }
}
