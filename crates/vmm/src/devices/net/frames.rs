//! What the device reads in the guest's frames: the IPv4 address it sends
//! from (an ARP's sender, or an IPv4 source), to announce it after a move.

use std::net::Ipv4Addr;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// The sender's IPv4 address of an Ethernet frame, if it is an ARP or an
/// IPv4 packet with a real (not 0.0.0.0) source.
pub fn sender_ipv4(frame: &[u8]) -> Option<Ipv4Addr> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let at = match ethertype {
        ETHERTYPE_ARP => 28,
        ETHERTYPE_IPV4 => 26,
        _ => return None,
    };
    let octets: [u8; 4] = frame.get(at..at + 4)?.try_into().ok()?;
    let ip = Ipv4Addr::from(octets);
    (!ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_netlab::{garp_frame, rarp_frame, MacAddr};

    #[test]
    fn learns_from_arp_and_ipv4_but_not_from_rarp() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let ip = Ipv4Addr::new(10, 77, 1, 2);
        assert_eq!(sender_ipv4(&garp_frame(mac, ip)), Some(ip));
        assert_eq!(sender_ipv4(&rarp_frame(mac)), None);
        let mut v4 = [0u8; 34];
        v4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        v4[26..30].copy_from_slice(&[10, 77, 1, 9]);
        assert_eq!(sender_ipv4(&v4), Some(Ipv4Addr::new(10, 77, 1, 9)));
        assert_eq!(sender_ipv4(&v4[..20]), None);
    }
}
