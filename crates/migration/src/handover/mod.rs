//! After the commit, the VM's network identity follows it.
//!
//! From the pause on, the source's network device stops taking frames from
//! its host's network; they wait there (in the tap's queue). Once the
//! destination has committed, the source forwards them over the migration
//! link, oldest first, and then any stray frame that still reaches the old
//! place until the fabric has learnt the new one (bounded in time). The
//! destination delivers them into the guest before it takes anything from
//! its own host's network, and announces the VM's MAC (and IP) there right
//! after the commit and a few times after: never before, and never on an
//! abort, so the network learns the new place only once the VM runs there.
//!
//! In a post-copy (v11) the same messages travel on the main link between
//! the page batches: the source's push slips them in, the destination's
//! push receiver delivers them as they come.
//!
//! The engine knows nothing of taps: the VMM implements the traits below.

mod announce;
mod deliver;
mod forward;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use announce::{announce_on_schedule, AnnounceSchedule, Announcer, ANNOUNCE_SCHEDULE};
pub use deliver::{deliver_forwarded, Delivery};
pub use forward::{forward_after_commit, Forwarder, Pumped, STRAY_POLL};

use crate::guest::GuestError;

/// Whether a post-copy (or a hybrid that switched) on protocol `version`
/// carries the VM's frames between its pages. Both sides ask it: a v7..v10
/// peer's post-copy takes only pages on the main connection, so it is sent
/// none and opens its network at once, as before v11.
pub fn forwards_during_postcopy(version: u16) -> bool {
    version >= crate::protocol::POSTCOPY_FORWARD_VERSION
}

/// Most frames one `Forwarded` message carries: 64 full-size Ethernet
/// frames stay far below the control-frame limit.
pub const FRAMES_PER_MESSAGE: usize = 64;

/// The VM's network at its old place, after the commit.
pub trait SourceNetwork: Send {
    /// Frames that reached the VM's old place and wait there, oldest
    /// first, at most `max`; empty when none is waiting now.
    fn take_waiting(&mut self, max: usize) -> Result<Vec<Vec<u8>>, GuestError>;
}

/// The VM's network at its new place, after the commit.
pub trait DestinationNetwork: Send {
    /// Delivers one forwarded frame into the guest, ahead of anything from
    /// this host's network.
    fn deliver(&mut self, frame: Vec<u8>) -> Result<(), GuestError>;
    /// The frames held since the pause are all delivered (or will never
    /// come): take the VM's frames from this host's network from now on.
    fn open(&mut self) -> Result<(), GuestError>;
}

/// A borrowed device is one too (pre-copy lends the caller's).
impl<N: DestinationNetwork + ?Sized> DestinationNetwork for &mut N {
    fn deliver(&mut self, frame: Vec<u8>) -> Result<(), GuestError> {
        (**self).deliver(frame)
    }

    fn open(&mut self) -> Result<(), GuestError> {
        (**self).open()
    }
}

/// How long the source keeps forwarding.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// Strays are forwarded at most this long after the commit.
    pub window: Duration,
    /// ... and stop earlier once none has come for this long after the
    /// held frames went out: the fabric has learnt the new place.
    pub quiet: Duration,
    /// Most frames forwarded in all; the rest are dropped and counted (a
    /// flood must not keep the source busy).
    pub max_frames: u64,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(1),
            quiet: Duration::from_millis(200),
            max_frames: 65_536,
        }
    }
}

/// What the source forwarded, for its report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardReport {
    /// Frames that arrived between the pause and the commit.
    pub held: u64,
    /// Frames that arrived after the commit, before the fabric learnt.
    pub strays: u64,
    /// Frames beyond `max_frames`, not forwarded.
    pub dropped: u64,
    pub bytes: u64,
    /// From the commit to the last held frame written to the link.
    pub held_sent_ms: f64,
    /// From the commit to the ForwardEnd.
    pub window_ms: f64,
    /// Why forwarding stopped early, if it did (the link failed): frames
    /// still waiting then were lost.
    pub error: Option<String>,
}

/// What the destination received and delivered, for its report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliverReport {
    pub delivered: u64,
    pub bytes: u64,
    /// Frames the device refused (its receive path failed).
    pub refused: u64,
    /// From the start of delivery to opening this host's network to the VM.
    pub opened_ms: f64,
    /// What the source said it forwarded and dropped, from its ForwardEnd.
    pub source_forwarded: Option<u64>,
    pub source_dropped: Option<u64>,
    /// Why delivery stopped before the source's ForwardEnd, if it did.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the VM's network device failed while {stage}: {source}")]
    Device {
        stage: &'static str,
        source: GuestError,
    },
    #[error("the migration link failed while {stage}: {source}")]
    Link {
        stage: &'static str,
        source: crate::ProtocolError,
    },
}

#[cfg(test)]
mod tests;
