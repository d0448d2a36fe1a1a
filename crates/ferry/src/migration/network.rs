//! The VM's network card as the migration engine's handover sees it: the
//! destination announces the card's MAC (and the guest's IP) from its new
//! tap once the VM is committed there.

use ferry_migration::guest::GuestError;
use ferry_migration::handover::Announcer;
use ferry_vmm::devices::net::NetHandle;

/// One RARP (QEMU's form) and, when the guest's IP is known, a gratuitous
/// ARP, out of the card's tap.
pub struct NetAnnouncer(pub NetHandle);

impl Announcer for NetAnnouncer {
    fn announce(&self) -> Result<(), GuestError> {
        Ok(self.0.announce(None)?)
    }
}
