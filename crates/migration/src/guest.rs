//! What the engine drives: a source VM it reads and controls, and an
//! incoming VM it writes into. The VMM implements these for real KVM VMs;
//! `synthetic` implements them over plain memory for the engine's tests.

use crate::bitmap::PageBitmap;
use crate::protocol::{Offer, RamRange};

/// A guest-side failure, described for a human.
pub type GuestError = Box<dyn std::error::Error + Send + Sync>;

/// The running VM on the source.
pub trait SourceGuest {
    /// What the destination needs to judge and rebuild the VM.
    fn describe(&self) -> Result<Offer, GuestError>;
    /// Ranges that may hold non-zero data; everything else reads as zero
    /// and is skipped in the first round (the destination starts zeroed).
    fn populated(&self) -> Result<Vec<RamRange>, GuestError>;
    /// Copies guest memory at `gpa` into `dst` (the guest may be running).
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError>;
    /// Starts (or stops) recording written pages.
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), GuestError>;
    /// Every page written since the previous harvest; clears the record.
    fn harvest_dirty(&mut self) -> Result<PageBitmap, GuestError>;
    /// Parks the vCPUs for `percent` of the time (0 = full speed).
    fn set_throttle(&mut self, percent: u32) -> Result<(), GuestError>;
    /// Stops every vCPU; returns when all have stopped.
    fn pause(&mut self) -> Result<(), GuestError>;
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The complete state but memory, as one opaque record (paused only).
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
}

/// A VM being received: memory exists, nothing runs until `start`.
pub trait IncomingGuest {
    /// What `start` hands back: the running VM.
    type Running;
    /// Guest memory at `gpa..gpa+len`, or None if it is not all RAM.
    fn memory_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
    /// Loads the state record into vCPUs and devices; nothing runs yet.
    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// Runs the VM: called only after the source committed.
    fn start(self) -> Result<Self::Running, GuestError>;
}
