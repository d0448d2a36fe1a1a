//! The kernel's view of a TCP socket (TCP_INFO): how many segments it
//! retransmitted, which is what a lost packet costs a connection.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// tcpi_total_retrans of `stream`, or None if the kernel would not say.
pub(crate) fn total_retransmissions(stream: &TcpStream) -> Option<u32> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given, and
    // the descriptor is an open TCP socket owned by `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_total_retrans)
}
