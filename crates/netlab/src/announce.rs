//! The frames that tell a switch where a MAC now lives: a RARP in QEMU's
//! format and a gratuitous ARP, both padded to the 60-byte Ethernet
//! minimum, and a way to send them from an interface of a namespace (what
//! the stand-in does after it moved; the VMM writes the same frames to
//! its tap).

use std::net::Ipv4Addr;

use crate::netns::in_netns;
use crate::{MacAddr, NetlabError};

/// Ethernet frame length without FCS, the minimum a sender pads to.
pub const ANNOUNCE_FRAME_LEN: usize = 60;

const BROADCAST: [u8; 6] = [0xff; 6];
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_RARP: u16 = 0x8035;
const ARP_REQUEST: u16 = 1;
const RARP_REQUEST_REVERSE: u16 = 3;

/// An ARP-format frame (Ethernet + 28-byte ARP body for IPv4 over
/// Ethernet), padded with zeros.
fn arp_format_frame(
    ethertype: u16,
    opcode: u16,
    mac: MacAddr,
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> [u8; ANNOUNCE_FRAME_LEN] {
    let mut f = [0u8; ANNOUNCE_FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&opcode.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0);
    f[28..32].copy_from_slice(&sender_ip.octets());
    f[32..38].copy_from_slice(&target_mac);
    f[38..42].copy_from_slice(&target_ip.octets());
    f
}

/// QEMU's announce: RARP "request reverse" with sender and target MAC the
/// VM's own and no IP addresses.
pub fn rarp_frame(mac: MacAddr) -> [u8; ANNOUNCE_FRAME_LEN] {
    arp_format_frame(
        ETHERTYPE_RARP,
        RARP_REQUEST_REVERSE,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac.0,
        Ipv4Addr::UNSPECIFIED,
    )
}

/// A gratuitous ARP: a broadcast request for the sender's own IP, which
/// also refreshes neighbours' ARP caches.
pub fn garp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; ANNOUNCE_FRAME_LEN] {
    arp_format_frame(ETHERTYPE_ARP, ARP_REQUEST, mac, ip, [0; 6], ip)
}

/// Sends each frame as is (a full Ethernet frame) out of interface
/// `ifname` of namespace `ns`, through a raw packet socket.
pub fn send_frames(ns: &str, ifname: &str, frames: &[&[u8]]) -> Result<(), NetlabError> {
    in_netns(ns, || raw_send(ifname, frames))?.map_err(|source| NetlabError::Io {
        ns: ns.to_string(),
        what: format!("sending {} announce frame(s) on {ifname}", frames.len()),
        source,
    })
}

fn raw_send(ifname: &str, frames: &[&[u8]]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let name = std::ffi::CString::new(ifname)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            0, // protocol 0: send only, receive nothing
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    for frame in frames {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address pointers are valid for the lengths
        // given, and `fd` is an open packet socket.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0x6e, 0x6c, 0x00, 0x07, 0x02]);

    #[test]
    fn rarp_is_qemus_format() {
        let f = rarp_frame(MAC);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &MAC.0); // sender
        assert_eq!(&f[32..38], &MAC.0); // target
        assert!(f[28..32].iter().chain(&f[38..]).all(|&b| b == 0));
    }

    #[test]
    fn gratuitous_arp_asks_for_its_own_address() {
        let ip = Ipv4Addr::new(10, 77, 7, 2);
        let f = garp_frame(MAC, ip);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[38..42], &ip.octets());
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
