//! `--net tap=NAME[,netns=NS][,mac=AA:BB:CC:DD:EE:FF]`: the network card
//! of `ferry run`, `ferry receive` and `ferry restore`, parsed into the
//! VMM's typed config with an error that names the bad part.

use std::str::FromStr;

use ferry_netlab::MacAddr;
use ferry_vmm::devices::net::{NetConfig, DEFAULT_MAC};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetFlagError {
    #[error("--net needs tap=NAME (e.g. --net tap=tap0,netns=hostA,mac=02:00:00:00:00:01)")]
    MissingTap,
    #[error("--net: {0:?} is not key=value (keys: tap, netns, mac)")]
    NotKeyValue(String),
    #[error("--net: unknown key {0:?} (keys: tap, netns, mac)")]
    UnknownKey(String),
    #[error("--net: {0} given twice")]
    Twice(&'static str),
    #[error(
        "--net: tap name {0:?} must have 1 to 15 characters, none of them '/', ',' or whitespace"
    )]
    BadTap(String),
    #[error("--net: namespace {0:?} must be a name under /run/netns (no '/', not . or ..)")]
    BadNetns(String),
    #[error("--net: mac {0:?} is not a MAC address (six pairs of hex digits joined by ':')")]
    BadMac(String),
    #[error("--net: mac {0} is a multicast address; a card needs a unicast one (even first byte)")]
    MulticastMac(String),
}

/// The parsed flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetFlag(pub NetConfig);

impl FromStr for NetFlag {
    type Err = NetFlagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut tap, mut netns, mut mac) = (None, None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| NetFlagError::NotKeyValue(part.to_string()))?;
            match key {
                "tap" => {
                    let ok = !value.is_empty()
                        && value.len() < 16
                        && !value.contains(|c: char| c == '/' || c.is_whitespace());
                    if !ok {
                        return Err(NetFlagError::BadTap(value.to_string()));
                    }
                    if tap.replace(value.to_string()).is_some() {
                        return Err(NetFlagError::Twice("tap"));
                    }
                }
                "netns" => {
                    if value.is_empty() || value.contains('/') || value == "." || value == ".." {
                        return Err(NetFlagError::BadNetns(value.to_string()));
                    }
                    if netns.replace(value.to_string()).is_some() {
                        return Err(NetFlagError::Twice("netns"));
                    }
                }
                "mac" => {
                    let parsed: MacAddr = value
                        .parse()
                        .map_err(|_| NetFlagError::BadMac(value.to_string()))?;
                    if parsed.0[0] & 1 != 0 {
                        return Err(NetFlagError::MulticastMac(parsed.to_string()));
                    }
                    if mac.replace(parsed).is_some() {
                        return Err(NetFlagError::Twice("mac"));
                    }
                }
                other => return Err(NetFlagError::UnknownKey(other.to_string())),
            }
        }
        Ok(NetFlag(NetConfig {
            tap: tap.ok_or(NetFlagError::MissingTap)?,
            netns,
            mac: mac.unwrap_or(DEFAULT_MAC),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_read() {
        let f: NetFlag = "tap=fn-ta,netns=fn-hostA,mac=02:AA:00:00:00:07"
            .parse()
            .unwrap();
        assert_eq!(f.0.tap, "fn-ta");
        assert_eq!(f.0.netns.as_deref(), Some("fn-hostA"));
        assert_eq!(f.0.mac, MacAddr([2, 0xaa, 0, 0, 0, 7]));
        let f: NetFlag = "tap=tap0".parse().unwrap();
        assert_eq!((f.0.netns, f.0.mac), (None, DEFAULT_MAC));
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let cases: &[(&str, NetFlagError)] = &[
            ("", NetFlagError::NotKeyValue(String::new())),
            ("netns=a", NetFlagError::MissingTap),
            ("tap", NetFlagError::NotKeyValue("tap".into())),
            ("tap=", NetFlagError::BadTap(String::new())),
            (
                "tap=abcdefghijklmnop",
                NetFlagError::BadTap("abcdefghijklmnop".into()),
            ),
            ("tap=a,tap=b", NetFlagError::Twice("tap")),
            ("tap=a,netns=..", NetFlagError::BadNetns("..".into())),
            (
                "tap=a,mac=02:00:00:00:00",
                NetFlagError::BadMac("02:00:00:00:00".into()),
            ),
            (
                "tap=a,mac=zz:00:00:00:00:01",
                NetFlagError::BadMac("zz:00:00:00:00:01".into()),
            ),
            (
                "tap=a,mac=01:00:5e:00:00:01",
                NetFlagError::MulticastMac("01:00:5e:00:00:01".into()),
            ),
            ("tap=a,speed=10", NetFlagError::UnknownKey("speed".into())),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<NetFlag>().unwrap_err(), *want, "{text:?}");
        }
    }
}
