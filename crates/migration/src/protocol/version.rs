//! Protocol version negotiation: both sides announce the range they speak
//! and the destination picks the highest version in both, so a fleet can
//! upgrade host by host and still migrate in either direction.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 12;
/// The first version with post-copy (frames 14 to 21).
pub const POSTCOPY_VERSION: u16 = 2;
/// The first version with page data on several streams (frames 22 to 25).
pub const STREAMS_VERSION: u16 = 3;
/// The first version whose commit survives a broken link (frames 26 and
/// 27): the destination waits for the source to come back with its decision.
pub const COMMIT_RECOVERY_VERSION: u16 = 4;
/// The first version that marks the blackout's start (frame 28) and
/// reports the destination's share of it (frame 29).
pub const BLACKOUT_TIMING_VERSION: u16 = 5;
/// The first version whose source forwards, after the commit, the frames
/// that reached the VM's old place (frames 30 and 31).
pub const NET_HANDOVER_VERSION: u16 = 7;
/// The first version whose connections open with a one-time session token
/// bound to the prepared migration (frames 32 and 33, before the Hello).
pub const SESSION_TOKEN_VERSION: u16 = 8;
/// The first version whose offer may describe the VM's disks (and whose
/// state record may carry a disk's section): a VM with a disk moves only
/// to a destination that speaks it.
pub const STORAGE_VERSION: u16 = 9;
/// The first version that copies a local disk with the memory: the offer
/// says so, and the disk's blocks travel as pages of the disk's range
/// (`DISK_COPY_BASE`).
pub const STORAGE_COPY_VERSION: u16 = 10;
/// The first version whose post-copy (and hybrid, once it switched)
/// forwards the frames that reached the VM's old place too: `Forwarded`
/// and `ForwardEnd` travel on the main connection between the pushed
/// pages. An older destination's post-copy takes only pages there, so it
/// gets none (its tap opens at once, as before).
pub const POSTCOPY_FORWARD_VERSION: u16 = 11;
/// The first version whose Pages frames on a TLS link may leave out the
/// payload crc32 (frame flag 1): the link's AEAD authenticates them.
pub const LINK_CHECKED_PAGES_VERSION: u16 = 12;
/// The oldest protocol version this build still speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;

/// An inclusive range of protocol versions. Version 0 is never valid, so a
/// zeroed or default-constructed range cannot negotiate by accident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    /// What this build speaks.
    pub const SUPPORTED: Self = Self {
        min: PROTOCOL_VERSION_MIN,
        max: PROTOCOL_VERSION,
    };

    pub fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    pub fn is_valid(&self) -> bool {
        self.min >= 1 && self.min <= self.max
    }

    pub fn contains(&self, version: u16) -> bool {
        self.is_valid() && (self.min..=self.max).contains(&version)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "v{}", self.min)
        } else {
            write!(f, "v{}..=v{}", self.min, self.max)
        }
    }
}

/// Why two sides cannot agree on a version. The message names both ranges
/// so an operator sees at once which host to upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error(
        "the peer's protocol version range {theirs} is empty or starts at v0 (we speak {ours})"
    )]
    InvalidPeerRange {
        ours: VersionRange,
        theirs: VersionRange,
    },
    #[error("our protocol version range {ours} is empty or starts at v0")]
    InvalidOwnRange { ours: VersionRange },
    #[error("no common protocol version: we speak {ours}, the peer speaks {theirs}")]
    NoCommonVersion {
        ours: VersionRange,
        theirs: VersionRange,
    },
}

/// The highest version both ranges contain.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, NegotiationError> {
    if !ours.is_valid() {
        return Err(NegotiationError::InvalidOwnRange { ours });
    }
    if !theirs.is_valid() {
        return Err(NegotiationError::InvalidPeerRange { ours, theirs });
    }
    let low = ours.min.max(theirs.min);
    let high = ours.max.min(theirs.max);
    if low > high {
        return Err(NegotiationError::NoCommonVersion { ours, theirs });
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange::new(min, max)
    }

    #[test]
    fn same_single_version() {
        assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate(r(1, 3), r(2, 5)), Ok(3));
        assert_eq!(negotiate(r(2, 5), r(1, 3)), Ok(3));
        assert_eq!(negotiate(r(1, 9), r(4, 4)), Ok(4));
    }

    #[test]
    fn touching_ranges_meet_at_the_edge() {
        assert_eq!(negotiate(r(1, 2), r(2, 7)), Ok(2));
    }

    #[test]
    fn disjoint_ranges_refused_naming_both() {
        let err = negotiate(r(1, 2), r(3, 4)).unwrap_err();
        assert_eq!(
            err,
            NegotiationError::NoCommonVersion {
                ours: r(1, 2),
                theirs: r(3, 4)
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("v1..=v2") && msg.contains("v3..=v4"), "{msg}");
    }

    #[test]
    fn empty_or_zero_ranges_refused() {
        assert!(matches!(
            negotiate(r(1, 1), r(3, 2)),
            Err(NegotiationError::InvalidPeerRange { .. })
        ));
        assert!(matches!(
            negotiate(r(1, 1), r(0, 1)),
            Err(NegotiationError::InvalidPeerRange { .. })
        ));
        assert!(matches!(
            negotiate(r(2, 1), r(1, 1)),
            Err(NegotiationError::InvalidOwnRange { .. })
        ));
    }

    #[test]
    fn postcopy_forwarding_needs_both_sides_at_v11() {
        let ours = VersionRange::SUPPORTED;
        // A peer that stops at v10 (or v7, the first with the pre-copy
        // handover) negotiates below it: its post-copy gets no frames.
        for old in [NET_HANDOVER_VERSION, 10] {
            let agreed = negotiate(ours, r(PROTOCOL_VERSION_MIN, old)).unwrap();
            assert!(agreed < POSTCOPY_FORWARD_VERSION, "v{agreed}");
        }
        assert_eq!(
            negotiate(ours, r(PROTOCOL_VERSION_MIN, POSTCOPY_FORWARD_VERSION)),
            Ok(POSTCOPY_FORWARD_VERSION)
        );
        const { assert!(POSTCOPY_FORWARD_VERSION <= PROTOCOL_VERSION) };
    }

    #[test]
    fn supported_range_is_valid_and_current() {
        assert!(VersionRange::SUPPORTED.is_valid());
        assert!(VersionRange::SUPPORTED.contains(PROTOCOL_VERSION));
        assert_eq!(
            negotiate(VersionRange::SUPPORTED, VersionRange::SUPPORTED),
            Ok(PROTOCOL_VERSION)
        );
    }
}
