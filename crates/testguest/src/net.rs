//! The guest's network service, in the syntax of its `net=` command-line
//! key (`guest/README.md`, "Network"): `IP/PREFIX:PORT`, and the combined
//! workload form `ferry run --workload` takes, terms joined with `+`
//! (`dirty:256:100+net:10.77.0.2/24:7000`).
//!
//! [`NetEcho`] accepts exactly what the guest accepts, so an address
//! refused here would have been refused by the guest too, only later and
//! inside a VM.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::disk::{DiskLoad, DiskLoadError};
use crate::workload::{Workload, WorkloadError};

const SYNTAX: &str = "IP/PREFIX:PORT (e.g. 10.77.0.2/24:7000)";

/// The guest's address on its virtio-net card and the port of its TCP
/// echo (numbered replies) and UDP echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetEcho {
    pub ip: Ipv4Addr,
    /// 1 to 32.
    pub prefix: u8,
    /// 1 to 65535.
    pub port: u16,
}

/// Why a `net` term was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not {SYNTAX}")]
    Syntax(String),
    #[error("{0:?} is not a dotted-quad IPv4 address")]
    BadIp(String),
    #[error(
        "{0} is not a unicast address the guest can take (not 0.x, 127.x, multicast or above)"
    )]
    NotUnicast(Ipv4Addr),
    #[error("prefix {0:?} is not 1 to 32")]
    BadPrefix(String),
    #[error("port {0:?} is not 1 to 65535")]
    BadPort(String),
}

impl fmt::Display for NetEcho {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.ip, self.prefix, self.port)
    }
}

impl FromStr for NetEcho {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NetError::Syntax(s.to_owned());
        let (ip, rest) = s.split_once('/').ok_or_else(syntax)?;
        let (prefix, port) = rest.split_once(':').ok_or_else(syntax)?;
        // The guest reads decimal octets of at most three digits; std's
        // parser is as strict (no leading zeros, no other forms).
        let ip: Ipv4Addr = ip.parse().map_err(|_| NetError::BadIp(ip.to_owned()))?;
        let first = ip.octets()[0];
        if first == 0 || first == 127 || first >= 224 {
            return Err(NetError::NotUnicast(ip));
        }
        let prefix = digits(prefix)
            .and_then(|p| u8::try_from(p).ok())
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| NetError::BadPrefix(prefix.to_owned()))?;
        let port = digits(port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| NetError::BadPort(port.to_owned()))?;
        Ok(NetEcho { ip, prefix, port })
    }
}

/// Digits only, below 2^64 (no sign, no spaces), as the guest reads numbers.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A workload with its optional network service and disk workload: the
/// `+`-joined form, e.g. `dirty:256:100+net:10.77.0.2/24:7000`,
/// `net:10.77.0.2/24:7000` (idle with a network) or
/// `dirty:64:10+disk:16:200`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestWorkload {
    pub workload: Workload,
    pub net: Option<NetEcho>,
    pub disk: Option<DiskLoad>,
}

/// Why a `+`-joined workload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestWorkloadError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("net term: {0}")]
    Net(#[from] NetError),
    #[error("disk term: {0}")]
    Disk(#[from] DiskLoadError),
    #[error(
        "{0} given twice in one workload (want at most one of idle/dirty, one net and one disk)"
    )]
    Twice(&'static str),
    #[error("empty term in {0:?} (terms are joined with a single +)")]
    EmptyTerm(String),
}

impl GuestWorkload {
    /// The guest command-line keys: `workload=... [net=...] [disk=...]`.
    pub fn cmdline_keys(&self) -> String {
        let mut keys = format!("workload={}", self.workload);
        if let Some(net) = self.net {
            keys.push_str(&format!(" net={net}"));
        }
        if let Some(disk) = self.disk {
            keys.push_str(&format!(" disk={disk}"));
        }
        keys
    }
}

impl fmt::Display for GuestWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.workload, self.net, self.disk) {
            (Workload::Idle, Some(net), None) => write!(f, "net:{net}"),
            (Workload::Idle, None, Some(disk)) => write!(f, "disk:{disk}"),
            (Workload::Idle, Some(net), Some(disk)) => write!(f, "net:{net}+disk:{disk}"),
            (w, net, disk) => {
                write!(f, "{w}")?;
                if let Some(net) = net {
                    write!(f, "+net:{net}")?;
                }
                if let Some(disk) = disk {
                    write!(f, "+disk:{disk}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for GuestWorkload {
    type Err = GuestWorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut workload = None;
        let mut net = None;
        let mut disk = None;
        for term in s.split('+') {
            if term.is_empty() {
                return Err(GuestWorkloadError::EmptyTerm(s.to_owned()));
            }
            if let Some(spec) = term.strip_prefix("net:") {
                if net.replace(spec.parse::<NetEcho>()?).is_some() {
                    return Err(GuestWorkloadError::Twice("net"));
                }
            } else if let Some(spec) = term.strip_prefix("disk:") {
                if disk.replace(spec.parse::<DiskLoad>()?).is_some() {
                    return Err(GuestWorkloadError::Twice("disk"));
                }
            } else if workload.replace(term.parse::<Workload>()?).is_some() {
                return Err(GuestWorkloadError::Twice("the workload"));
            }
        }
        Ok(GuestWorkload {
            workload: workload.unwrap_or(Workload::Idle),
            net,
            disk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Rate;

    #[test]
    fn parses_and_prints_the_net_term() {
        let n: NetEcho = "10.77.0.2/24:7000".parse().unwrap();
        assert_eq!(
            n,
            NetEcho {
                ip: Ipv4Addr::new(10, 77, 0, 2),
                prefix: 24,
                port: 7000
            }
        );
        assert_eq!(n.to_string(), "10.77.0.2/24:7000");
        assert!("192.168.1.1/32:1".parse::<NetEcho>().is_ok());
        assert!("1.2.3.4/1:65535".parse::<NetEcho>().is_ok());
    }

    #[test]
    fn refuses_what_the_guest_refuses() {
        let bad = |s: &str| s.parse::<NetEcho>().unwrap_err();
        assert!(matches!(bad("10.77.0.2:7000"), NetError::Syntax(_)));
        assert!(matches!(bad("10.77.0.2/24"), NetError::Syntax(_)));
        assert!(matches!(bad("10.77.0/24:7000"), NetError::BadIp(_)));
        assert!(matches!(bad("10.77.0.256/24:7000"), NetError::BadIp(_)));
        assert!(matches!(bad("010.77.0.2/24:7000"), NetError::BadIp(_)));
        assert!(matches!(bad("0.1.2.3/8:7"), NetError::NotUnicast(_)));
        assert!(matches!(bad("127.0.0.1/8:7"), NetError::NotUnicast(_)));
        assert!(matches!(bad("224.0.0.1/8:7"), NetError::NotUnicast(_)));
        assert!(matches!(bad("10.0.0.1/0:7"), NetError::BadPrefix(_)));
        assert!(matches!(bad("10.0.0.1/33:7"), NetError::BadPrefix(_)));
        assert!(matches!(bad("10.0.0.1/+8:7"), NetError::BadPrefix(_)));
        assert!(matches!(bad("10.0.0.1/8:0"), NetError::BadPort(_)));
        assert!(matches!(bad("10.0.0.1/8:65536"), NetError::BadPort(_)));
        assert!(matches!(bad("10.0.0.1/8:x"), NetError::BadPort(_)));
        let msg = bad("10.0.0.1/8:65536").to_string();
        assert!(msg.contains("65536") && msg.contains("1 to 65535"), "{msg}");
    }

    #[test]
    fn joined_terms_map_onto_the_two_keys() {
        let w: GuestWorkload = "dirty:256:100+net:10.77.0.2/24:7000".parse().unwrap();
        assert_eq!(
            w.workload,
            Workload::Dirty {
                ws_mib: 256,
                rate: Rate::MibPerSec(100),
                fill_mib: 0
            }
        );
        assert_eq!(
            w.cmdline_keys(),
            "workload=dirty:256:100 net=10.77.0.2/24:7000"
        );
        assert_eq!(w.to_string(), "dirty:256:100+net:10.77.0.2/24:7000");
        // Either order; net alone is idle with a network.
        let w: GuestWorkload = "net:10.77.0.2/24:7000+idle".parse().unwrap();
        assert_eq!(w.cmdline_keys(), "workload=idle net=10.77.0.2/24:7000");
        let w: GuestWorkload = "net:10.77.0.2/24:7000".parse().unwrap();
        assert_eq!(w.workload, Workload::Idle);
        assert_eq!(w.to_string(), "net:10.77.0.2/24:7000");
        let w: GuestWorkload = "dirty:1:max".parse().unwrap();
        assert_eq!(
            (w.net, w.cmdline_keys().as_str()),
            (None, "workload=dirty:1:max")
        );
    }

    #[test]
    fn the_disk_term_joins_dirty_and_net() {
        let w: GuestWorkload = "dirty:64:10+disk:16:200".parse().unwrap();
        assert_eq!(w.cmdline_keys(), "workload=dirty:64:10 disk=16:200");
        assert_eq!(w.to_string(), "dirty:64:10+disk:16:200");
        let w: GuestWorkload = "disk:1:max+net:10.77.0.2/24:7000+dirty:8:max"
            .parse()
            .unwrap();
        assert_eq!(
            w.cmdline_keys(),
            "workload=dirty:8:max net=10.77.0.2/24:7000 disk=1:max"
        );
        assert_eq!(
            w.to_string(),
            "dirty:8:max+net:10.77.0.2/24:7000+disk:1:max"
        );
        let w: GuestWorkload = "disk:2:5".parse().unwrap();
        assert_eq!(
            (w.workload, w.to_string().as_str()),
            (Workload::Idle, "disk:2:5")
        );
        let bad = |s: &str| s.parse::<GuestWorkload>().unwrap_err();
        assert_eq!(bad("disk:1:1+disk:1:1"), GuestWorkloadError::Twice("disk"));
        assert!(matches!(bad("idle+disk:0:1"), GuestWorkloadError::Disk(_)));
        assert!(bad("idle+disk:0:1").to_string().contains("disk term"));
    }

    #[test]
    fn refuses_malformed_joins() {
        let bad = |s: &str| s.parse::<GuestWorkload>().unwrap_err();
        assert_eq!(bad("idle+idle"), GuestWorkloadError::Twice("the workload"));
        assert_eq!(
            bad("net:10.0.0.2/8:1+net:10.0.0.3/8:1"),
            GuestWorkloadError::Twice("net")
        );
        assert!(matches!(bad("idle+"), GuestWorkloadError::EmptyTerm(_)));
        assert!(matches!(bad(""), GuestWorkloadError::EmptyTerm(_)));
        assert!(matches!(
            bad("dirty:1:0+net:10.0.0.2/8:1"),
            GuestWorkloadError::Workload(_)
        ));
        assert!(matches!(
            bad("idle+net:10.0.0.2/8"),
            GuestWorkloadError::Net(_)
        ));
        assert!(bad("idle+net:10.0.0.2/8").to_string().contains("net term"));
    }
}
