//! Small pieces both sides of post-copy need: waiting for a socket to have
//! data without committing to read a frame, and session numbers that pair
//! the fault channel with its migration.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// True when `stream` has bytes to read (or is closed: the read that
/// follows reports that), false if `timeout` passed first. Lets a reader
/// look up between frames without a read timeout that could cut a frame.
pub(crate) fn wait_readable(stream: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd that outlives the call, and the
    // descriptor belongs to `stream`, borrowed for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// A number no other migration on this host is likely to use.
pub(crate) fn new_session() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Raises the calling thread's priority: a vCPU waits on every request
/// these threads serve, and on a busy host an ordinary thread can wait
/// milliseconds for a core. Best effort: without CAP_SYS_NICE the thread
/// keeps its priority and post-copy still works, only slower to fault.
pub(crate) fn serve_faults_promptly() {
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the
    // calling thread on Linux, whose nice value is per thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, FAULT_SERVICE_NICE);
    }
}

/// Nice value of the threads on a fault's path.
const FAULT_SERVICE_NICE: i32 = -10;
