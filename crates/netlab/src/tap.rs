//! Opening one of the topology's taps from its host namespace the way the
//! contract says the VMM does (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR on an
//! existing tap), for code that needs a tap without a Ferry VMM: the
//! bench's QEMU (given the descriptor with `-netdev tap,fd=N`) and tests.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::netns::in_netns;
use crate::NetlabError;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// struct ifreq as TUNSETIFF reads it: the name, the flags, and padding
/// to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap `name` in namespace `ns`. The frames read and written carry
/// a virtio_net_hdr in front (10 bytes unless TUNSETVNETHDRSZ changes it).
/// A tap that does not exist (TUNSETIFF alone would create one), or that
/// someone holds already (EBUSY), is an error.
pub fn open_tap(ns: &str, name: &str) -> Result<File, NetlabError> {
    let io = |source| NetlabError::Io {
        ns: ns.to_string(),
        what: format!("opening tap {name}"),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a tap name has 1-15 characters",
        )));
    }
    in_netns(ns, || open_tap_here(name))?.map_err(io)
}

/// Opens tap `name` in the calling thread's own network namespace, with
/// the same checks as [`open_tap`]: it must exist and be free.
pub fn open_tap_here(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a tap name has 1-15 characters",
        ));
    }
    // TUNSETIFF on a name that does not exist would create a new,
    // unbridged tap: refuse instead.
    let cname = std::ffi::CString::new(name).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in the tap name")
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such interface here (is the topology up?)",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out
    // (a NUL-terminated name, the flags, padding to 40 bytes); the
    // descriptor is open on /dev/net/tun.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}
