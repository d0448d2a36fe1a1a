//! The VM's network card as the migration engine's handover sees it: the
//! destination announces the card's MAC (and the guest's IP) from its new
//! tap, delivers forwarded frames into the guest and then opens its tap;
//! the source hands over what its card held since the pause.

use ferry_migration::guest::GuestError;
use ferry_migration::handover::{Announcer, DestinationNetwork, SourceNetwork};
use ferry_vmm::devices::net::NetHandle;

/// One RARP (QEMU's form) and, when the guest's IP is known, a gratuitous
/// ARP, out of the card's tap.
pub struct NetAnnouncer(pub NetHandle);

impl Announcer for NetAnnouncer {
    fn announce(&self) -> Result<(), GuestError> {
        Ok(self.0.announce(None)?)
    }
}

/// The destination's card: forwarded frames go in ahead of its own tap's,
/// which it reads again once they are all in.
pub struct NetDestination(pub NetHandle);

impl DestinationNetwork for NetDestination {
    fn deliver(&mut self, frame: Vec<u8>) -> Result<(), GuestError> {
        self.0.inject(&frame);
        Ok(())
    }

    fn open(&mut self) -> Result<(), GuestError> {
        self.0.release();
        Ok(())
    }
}

/// The source's card after the commit: what it held, oldest first.
pub struct NetSource {
    handle: NetHandle,
    taken: std::collections::VecDeque<Vec<u8>>,
}

impl NetSource {
    pub fn new(handle: NetHandle) -> Self {
        Self {
            handle,
            taken: Default::default(),
        }
    }
}

impl SourceNetwork for NetSource {
    fn take_waiting(&mut self, max: usize) -> Result<Vec<Vec<u8>>, GuestError> {
        self.taken.extend(self.handle.take_held());
        let n = max.min(self.taken.len());
        Ok(self.taken.drain(..n).collect())
    }
}
