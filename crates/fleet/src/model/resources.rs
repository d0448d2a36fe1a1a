//! Memory and vCPUs, the two things a host has a capacity of.

use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub mem_bytes: u64,
    pub vcpus: u32,
}

impl Resources {
    pub fn new(mem_bytes: u64, vcpus: u32) -> Self {
        Self { mem_bytes, vcpus }
    }

    pub fn plus(self, o: Resources) -> Self {
        Self {
            mem_bytes: self.mem_bytes.saturating_add(o.mem_bytes),
            vcpus: self.vcpus.saturating_add(o.vcpus),
        }
    }

    pub fn minus(self, o: Resources) -> Self {
        Self {
            mem_bytes: self.mem_bytes.saturating_sub(o.mem_bytes),
            vcpus: self.vcpus.saturating_sub(o.vcpus),
        }
    }

    /// True when `need` fits in self.
    pub fn holds(self, need: Resources) -> bool {
        self.mem_bytes >= need.mem_bytes && self.vcpus >= need.vcpus
    }

    /// What is left of self after keeping `percent` of it free.
    pub fn less_headroom(self, percent: u32) -> Self {
        let keep = u64::from(100 - percent.min(100));
        Self {
            mem_bytes: (u128::from(self.mem_bytes) * u128::from(keep) / 100) as u64,
            vcpus: (u64::from(self.vcpus) * keep / 100) as u32,
        }
    }
}

/// A byte count the way a person reads it: "4 GiB", "512 MiB".
pub fn show_bytes(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b.div_ceil(MIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_keeps_a_share_free() {
        let r = Resources::new(100 * GIB, 64).less_headroom(10);
        assert_eq!(r.mem_bytes, 90 * GIB);
        assert_eq!(r.vcpus, 57);
        assert!(r.holds(Resources::new(90 * GIB, 57)));
        assert!(!r.holds(Resources::new(90 * GIB + 1, 1)));
        assert_eq!(show_bytes(4 * GIB), "4 GiB");
        assert_eq!(show_bytes(512 * MIB), "512 MiB");
    }
}
