//! An Ethernet MAC address, parsed from and shown as `02:00:00:00:00:01`.

use std::fmt;
use std::str::FromStr;

use crate::NetlabError;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetlabError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetlabError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows_the_same_text() {
        let mac: MacAddr = "02:6E:6c:00:07:02".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x6e, 0x6c, 0x00, 0x07, 0x02]);
        assert_eq!(mac.to_string(), "02:6e:6c:00:07:02");
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:01",
            "zz:00:00:00:00:01",
            "02-00-00-00-00-01",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(NetlabError::BadMac(_))),
                "{bad}"
            );
        }
    }
}
