//! What the engine drives: a source VM it reads and controls, and an
//! incoming VM it writes into. The VMM implements these for real KVM VMs;
//! `synthetic` implements them over plain memory for the engine's tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::protocol::{Offer, RamRange};

/// A guest-side failure, described for a human.
pub type GuestError = Box<dyn std::error::Error + Send + Sync>;

/// Guest memory that several threads may read at once: a paused source's
/// memory while post-copy serves requests and pushes pages side by side.
pub trait PageReader: Send + Sync {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError>;
}

/// A destination's memory while post-copy fills it: accesses to pages not
/// yet here wait (in the kernel) until one of the `place` calls puts them
/// there. Shared by the fault service and the page receivers.
pub trait LazyMemory: Send + Sync {
    /// Waits up to `timeout` for an access to a missing page; its address.
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, GuestError>;
    /// Places whole pages at `gpa`, atomically, and wakes their waiters;
    /// pages already present stay as they are.
    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Places zero pages (same rules as `place`).
    fn place_zero(&self, gpa: u64, len: u64) -> Result<(), GuestError>;
    /// Every page is here: stop intercepting accesses.
    fn finish(&self) -> Result<(), GuestError>;
}

/// What a pause measured: when it was asked for, and when the last vCPU
/// stopped running guest code (before `requested` when the brake had
/// parked them all already). The blackout begins at `all_stopped`.
#[derive(Debug, Clone, Copy)]
pub struct PauseTiming {
    pub requested: Instant,
    pub all_stopped: Instant,
}

impl PauseTiming {
    /// For a guest that stops the moment it is asked to.
    pub fn now() -> Self {
        let t = Instant::now();
        Self {
            requested: t,
            all_stopped: t,
        }
    }
}

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
    /// Stops every vCPU; returns when all have stopped, and when they did.
    fn pause(&mut self) -> Result<PauseTiming, GuestError>;
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The complete state but memory, as one opaque record (paused only).
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// Paused, right before the state is saved for a move: makes the VM's
    /// storage final here (every request it took done and flushed) and
    /// lets the destination take it (the image's lock given up), so two
    /// hosts never write it at once. `resume` takes it back (an abort).
    /// Whether the VM has storage that was handed over.
    fn release_storage(&mut self) -> Result<bool, GuestError> {
        Ok(false)
    }
    /// Write-blocking, for a disk copied with the VM: while on, each write
    /// the guest makes to it completes only once the copy has sent the
    /// round that carries its block, so the guest cannot outwrite the
    /// link. Off (which `pause` and the end of dirty logging imply too)
    /// releases every waiting write. Whether the VM has such a disk.
    fn hold_disk_writes(&mut self, _on: bool) -> Result<bool, GuestError> {
        Ok(false)
    }
    /// The round built from the last harvest was sent in full.
    fn round_sent(&mut self) {}
    /// A reader of guest memory other threads can share: post-copy's
    /// threads read the paused VM's memory through it, and the page-data
    /// streams read the running VM's (with `read`'s rule: a page may come
    /// torn while the guest writes it, and then the dirty log has it).
    fn memory_reader(&self) -> Result<Arc<dyn PageReader>, GuestError>;
    /// The VM's network at this place, once the VM has moved: where frames
    /// that still reach it wait to be forwarded. None: the VM has no
    /// network device.
    fn network_after_commit(&mut self) -> Option<Box<dyn crate::handover::SourceNetwork>> {
        None
    }
}

/// A VM being received: memory exists, nothing runs until `start`.
pub trait IncomingGuest {
    /// What `start` hands back: the running VM.
    type Running;
    /// Guest memory at `gpa..gpa+len`, or None if it is not all RAM.
    fn memory_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
    /// All of guest memory, one slice per RAM range with its guest
    /// address, for receivers on several threads to split between them.
    fn ram_mut(&mut self) -> Vec<(u64, &mut [u8])>;
    /// Loads the state record into vCPUs and devices; nothing runs yet.
    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// Runs the VM: called only after the source committed.
    fn start(self) -> Result<Self::Running, GuestError>;
    /// Runs the VM with the pages in `missing` still at the source
    /// (post-copy): any local copy of them is dropped, and every access to
    /// one waits until it is placed through the returned memory.
    fn start_lazy(
        self,
        missing: &PageBitmap,
    ) -> Result<(Self::Running, Arc<dyn LazyMemory>), GuestError>;
    /// The started VM's network at this place, for a post-copy to deliver
    /// the frames forwarded from the old place into and then open (the
    /// card starts held). None: the VM has no network device.
    fn network_of(
        _running: &Self::Running,
    ) -> Option<Box<dyn crate::handover::DestinationNetwork>> {
        None
    }
}
