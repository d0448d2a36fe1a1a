//! The guest's disk workload, in the syntax of its `disk=` command-line key
//! (`guest/README.md`, "Disk"): `MB:RATE`, and as a `+`-joined workload
//! term `disk:MB:RATE` (`dirty:64:10+disk:16:200`).
//!
//! [`DiskLoad`] accepts exactly what the guest accepts.

use std::fmt;
use std::str::FromStr;

/// Largest MB the guest's table of acknowledged generations holds.
pub const DISK_MAX_MIB: u64 = 256;

/// How fast the guest goes round its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskRate {
    /// 4 KiB block rewrites (a read back and a write) per second.
    BlocksPerSec(u64),
    Max,
}

/// `MB:RATE`: the disk workload over the first MB MiB of the guest's
/// virtio-blk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskLoad {
    /// 1 to [`DISK_MAX_MIB`].
    pub mib: u64,
    pub rate: DiskRate,
}

impl DiskLoad {
    /// Bytes of disk the workload needs.
    pub fn bytes(&self) -> u64 {
        self.mib << 20
    }
}

/// Why a `disk` term was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskLoadError {
    #[error("{0:?} is not MB:RATE (e.g. 16:200; RATE in 4 KiB blocks per second, or max)")]
    Syntax(String),
    #[error("disk MB {0:?} is not 1 to {DISK_MAX_MIB}")]
    BadSize(String),
    #[error("disk RATE {0:?} is not a number of blocks per second above 0, or max")]
    BadRate(String),
}

impl fmt::Display for DiskLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate {
            DiskRate::BlocksPerSec(r) => write!(f, "{}:{r}", self.mib),
            DiskRate::Max => write!(f, "{}:max", self.mib),
        }
    }
}

impl FromStr for DiskLoad {
    type Err = DiskLoadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mib, rate) = s
            .split_once(':')
            .ok_or_else(|| DiskLoadError::Syntax(s.to_owned()))?;
        let mib = digits(mib)
            .filter(|m| (1..=DISK_MAX_MIB).contains(m))
            .ok_or_else(|| DiskLoadError::BadSize(mib.to_owned()))?;
        let rate = if rate == "max" {
            DiskRate::Max
        } else {
            DiskRate::BlocksPerSec(
                digits(rate)
                    .filter(|&r| r > 0)
                    .ok_or_else(|| DiskLoadError::BadRate(rate.to_owned()))?,
            )
        };
        Ok(DiskLoad { mib, rate })
    }
}

/// Digits only, below 2^64, as the guest reads numbers.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d: DiskLoad = "16:200".parse().unwrap();
        assert_eq!(
            d,
            DiskLoad {
                mib: 16,
                rate: DiskRate::BlocksPerSec(200)
            }
        );
        assert_eq!(d.to_string(), "16:200");
        assert_eq!(d.bytes(), 16 << 20);
        let d: DiskLoad = "256:max".parse().unwrap();
        assert_eq!((d.rate, d.to_string().as_str()), (DiskRate::Max, "256:max"));
    }

    #[test]
    fn refuses_what_the_guest_refuses() {
        let bad = |s: &str| s.parse::<DiskLoad>().unwrap_err();
        assert!(matches!(bad("16"), DiskLoadError::Syntax(_)));
        assert!(matches!(bad("0:10"), DiskLoadError::BadSize(_)));
        assert!(matches!(bad("257:10"), DiskLoadError::BadSize(_)));
        assert!(matches!(bad("+1:10"), DiskLoadError::BadSize(_)));
        assert!(matches!(bad("1:0"), DiskLoadError::BadRate(_)));
        assert!(matches!(bad("1:fast"), DiskLoadError::BadRate(_)));
        assert!(matches!(bad("1:10:3"), DiskLoadError::BadRate(_)));
        assert!(bad("257:10").to_string().contains("1 to 256"));
    }
}
