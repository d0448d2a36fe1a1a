//! The tap a network card is plugged into: an existing tap (never one
//! made on the fly), opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
//! optionally from inside a network namespace, with the 12-byte
//! virtio_net_hdr_v1 in front of every frame, non-blocking.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use super::NetError;

/// The virtio-net header of a VERSION_1 device (virtio 1.2, 5.1.6).
pub const VNET_HDR_LEN: usize = 12;

vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, 'T' as u32, 216, libc::c_int);

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens tap `name`, in network namespace `netns` when given.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Tap, NetError> {
        let file = match netns {
            Some(ns) => ferry_netlab::open_tap(ns, name).map_err(|e| NetError::Tap {
                tap: name.to_string(),
                reason: e.to_string(),
            })?,
            None => ferry_netlab::open_tap_here(name).map_err(|e| NetError::Tap {
                tap: name.to_string(),
                reason: describe_open_error(&e),
            })?,
        };
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `size` for the call; the fd is an open tap.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &size) };
        if rc < 0 {
            return Err(NetError::Tap {
                tap: name.to_string(),
                reason: format!(
                    "setting its header size: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        // SAFETY: F_GETFL/F_SETFL only read and set the descriptor's flags.
        let rc = unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(NetError::Tap {
                tap: name.to_string(),
                reason: format!(
                    "making it non-blocking: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One frame (header included) into `buf`; None when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One frame (header included); false if the tap's queue is full.
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<bool> {
        match (&self.file).write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn describe_open_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) => "it is already in use by another process".into(),
        Some(libc::EPERM) => format!("{e} (opening a tap needs CAP_NET_ADMIN)"),
        _ => e.to_string(),
    }
}
