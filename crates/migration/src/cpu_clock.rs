//! Costs measured as CPU time, not wall time: a live round's harvest runs
//! while the vCPUs compete for the cores, so its wall time says more about
//! the scheduler than about what the same work costs in the blackout, when
//! the vCPUs are stopped and the thread is boosted. Also what share of the
//! host a round's threads got.

use std::time::Duration;

/// CPU time this thread has used.
pub fn thread_cpu_time() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time this process has used (every thread).
pub fn process_cpu_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; these clock ids
    // exist on every Linux.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The kernel's smoothed round-trip time of a TCP connection: the link's
/// own, without the wake-ups of threads that a busy host delays.
pub fn tcp_round_trip(stream: &std::net::TcpStream) -> Option<Duration> {
    let info = tcp_info(stream).ok()?;
    (info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// The kernel's TCP_INFO of a connection.
pub fn tcp_info(stream: &std::net::TcpStream) -> std::io::Result<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we
    // own, and the descriptor belongs to the stream borrowed here.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}
