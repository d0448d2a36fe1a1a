//! Whose turn it is at the shared store file. Every process takes an
//! exclusive flock on a lock file beside the store before it opens the
//! store, and drops it once it has closed it again. The kernel wakes a
//! waiter the moment the holder lets go, so under load the processes take
//! turns, where polling redb's own lock let a busy few keep the file and a
//! slow one give up (`Database already open`) after its whole wait.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// A held turn; the lock goes with the file when this is dropped.
pub struct Turn {
    _lock: File,
}

/// Why no turn was had.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("opening the lock file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("taking the lock on {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another process held {path} for more than {0:?}", .waited)]
    TimedOut { path: PathBuf, waited: Duration },
}

/// The lock file of the store at `store`.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn open(path: &Path) -> Result<File, TurnError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| TurnError::Open {
            path: path.to_owned(),
            source,
        })
}

fn flock(file: &File, how: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock only acts on the descriptor, which `file` owns and
        // keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes the turn at `store`, waiting at most `wait`.
pub fn take(store: &Path, wait: Duration) -> Result<Turn, TurnError> {
    let path = lock_path(store);
    let file = open(&path)?;
    match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => return Ok(Turn { _lock: file }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(source) => return Err(TurnError::Lock { path, source }),
    }
    // A blocking flock has no timeout: it waits in a thread of its own,
    // which hands the lock over, or drops it at once if nobody waits for
    // it any more.
    let (tx, rx) = mpsc::sync_channel(1);
    let waiter_path = path.clone();
    std::thread::spawn(move || {
        let got = flock(&file, libc::LOCK_EX)
            .map(|()| file)
            .map_err(|source| TurnError::Lock {
                path: waiter_path,
                source,
            });
        let _ = tx.send(got);
    });
    match rx.recv_timeout(wait) {
        Ok(got) => got.map(|file| Turn { _lock: file }),
        Err(_) => Err(TurnError::TimedOut { path, waited: wait }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-turn-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("fleet.redb")
    }

    #[test]
    fn a_waiter_gets_the_turn_as_soon_as_the_holder_lets_go() {
        let store = scratch("handover");
        let held = take(&store, Duration::from_secs(1)).unwrap();
        let store2 = store.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let turn = take(&store2, Duration::from_secs(10)).unwrap();
            (t.elapsed(), turn)
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        let (waited, _turn) = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let _ = std::fs::remove_dir_all(store.parent().unwrap());
    }

    #[test]
    fn a_turn_held_too_long_is_a_clear_timeout_and_frees_itself_later() {
        let store = scratch("timeout");
        let held = take(&store, Duration::from_secs(1)).unwrap();
        let err = take(&store, Duration::from_millis(100)).err().unwrap();
        assert!(matches!(err, TurnError::TimedOut { .. }), "{err}");
        drop(held);
        // The abandoned waiter took the lock and let it go again.
        take(&store, Duration::from_secs(5)).unwrap();
        let _ = std::fs::remove_dir_all(store.parent().unwrap());
    }
}
