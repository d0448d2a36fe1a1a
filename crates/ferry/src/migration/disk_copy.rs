//! A local disk copied with the VM (`--copy-storage`). The engine moves
//! pages; the disk's blocks are pages of the disk's range
//! (`DISK_COPY_BASE`), so the first pass, the dirty rounds, the streams,
//! the switchover decision and the blackout carry them as they carry
//! memory. On the source this reads the running image beside its device
//! and harvests the blocks the guest wrote; on the destination the pages
//! land in a new image (see `ferry_vmm::devices::block::copy_target`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use ferry_migration::bitmap::RangeBits;
use ferry_migration::guest::GuestError;
use ferry_migration::protocol::{RamRange, DISK_COPY_BASE, PAGE_SIZE};
use ferry_migration::stats::DiskCopyReport;
use ferry_vmm::devices::block::copy_source::DiskCopySource;
use ferry_vmm::devices::block::dirty::DIRTY_BLOCK;
use ferry_vmm::Vm;

const _: () = assert!(
    DIRTY_BLOCK == PAGE_SIZE as u64,
    "a block travels as one page"
);

/// The source's disk, seen as the pages of the disk's range.
#[derive(Debug)]
pub struct SourceDisk {
    reader: DiskCopySource,
    blocks_sent: AtomicU64,
    blackout_blocks: AtomicU64,
    first_pass_blocks: AtomicU64,
    rounds_with_writes: AtomicU32,
    paused: AtomicBool,
}

impl SourceDisk {
    /// The VM's disk, ready to be copied; Err says why it cannot be.
    pub fn open(vm: &Vm) -> Result<SourceDisk, String> {
        let reader = match vm.disk_copy_source() {
            None => {
                return Err(
                    "--copy-storage: the VM has no disk to copy (started without --disk)".into(),
                )
            }
            Some(r) => r.map_err(|e| format!("--copy-storage: {e}"))?,
        };
        if reader.size() % DIRTY_BLOCK != 0 {
            return Err(format!(
                "--copy-storage: the image {} is {} bytes, not whole 4 KiB blocks; only such images can be copied",
                reader.path().display(),
                reader.size()
            ));
        }
        Ok(SourceDisk {
            reader,
            blocks_sent: AtomicU64::new(0),
            blackout_blocks: AtomicU64::new(0),
            first_pass_blocks: AtomicU64::new(0),
            rounds_with_writes: AtomicU32::new(0),
            paused: AtomicBool::new(false),
        })
    }

    /// Whether `gpa` is a page of the disk rather than of RAM.
    pub fn holds(gpa: u64) -> bool {
        gpa >= DISK_COPY_BASE
    }

    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        self.reader.read(gpa - DISK_COPY_BASE, dst)?;
        let blocks = dst.len() as u64 / DIRTY_BLOCK;
        self.blocks_sent.fetch_add(blocks, Ordering::Relaxed);
        if self.paused.load(Ordering::Relaxed) {
            self.blackout_blocks.fetch_add(blocks, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The image's allocated extents, as ranges of the disk's pages.
    pub fn populated(&self) -> Result<Vec<RamRange>, GuestError> {
        let extents = self.reader.allocated()?;
        let bytes: u64 = extents.iter().map(|e| e.1).sum();
        self.first_pass_blocks
            .store(bytes / DIRTY_BLOCK, Ordering::Relaxed);
        Ok(extents
            .into_iter()
            .map(|(offset, len)| RamRange {
                gpa: DISK_COPY_BASE + offset,
                len,
            })
            .collect())
    }

    pub fn set_tracking(&self, on: bool) {
        self.reader.set_tracking(on);
    }

    /// Write-blocking on or off (see `ferry_vmm::devices::block::copy_hold`).
    pub fn hold_writes(&self, on: bool) {
        self.reader.hold_writes(on);
    }

    pub fn round_sent(&self) {
        self.reader.round_sent();
    }

    /// The blocks written since the last harvest, as the disk range's bits.
    pub fn harvest(&self) -> RangeBits {
        let bits = self.reader.harvest();
        if bits.iter().any(|&w| w != 0) {
            self.rounds_with_writes.fetch_add(1, Ordering::Relaxed);
        }
        RangeBits {
            gpa: DISK_COPY_BASE,
            pages: self.reader.blocks(),
            bits,
        }
    }

    /// The VM paused (or resumed): reads from now on are the blackout's.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn report(&self) -> DiskCopyReport {
        let hold = self.reader.hold_totals();
        DiskCopyReport {
            image: self.reader.path().display().to_string(),
            image_bytes: self.reader.size(),
            first_pass_blocks: self.first_pass_blocks.load(Ordering::Relaxed),
            blocks_sent: self.blocks_sent.load(Ordering::Relaxed),
            blackout_blocks: self.blackout_blocks.load(Ordering::Relaxed),
            rounds_with_writes: self.rounds_with_writes.load(Ordering::Relaxed),
            write_blocking_ms: hold.blocking.as_secs_f64() * 1e3,
            writes_held: hold.writes_held,
            longest_hold_ms: hold.longest.as_secs_f64() * 1e3,
            writes_released_unsent: hold.released_unsent,
        }
    }
}
