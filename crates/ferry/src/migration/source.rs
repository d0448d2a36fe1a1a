//! A running VM as the migration engine's source.

use ferry_migration::bitmap::{PageBitmap, RangeBits};
use std::sync::Arc;
use std::time::Duration;

use ferry_migration::guest::{GuestError, PageReader, PauseTiming, SourceGuest};
use ferry_migration::handover::SourceNetwork;

use super::disk_copy::SourceDisk;
use super::network::NetSource;
use ferry_migration::protocol::{DiskOffer, Offer, RamRange};
use ferry_migration::stats::DiskCopyReport;
use ferry_vmm::compat::encode_cpuid;
use ferry_vmm::{GuestRam, Vm};

/// Features every Ferry VM relies on; a destination refuses names it does
/// not know.
pub const VM_FEATURES: &[&str] = &["irqchip", "pit2", "com1"];
/// Offered when the VM has a virtio-net card: a destination without a
/// tap for it refuses the offer.
pub const NET_FEATURE: &str = "virtio-net";
/// Offered when the VM has a virtio-blk disk (described in the offer's
/// disks): a destination without its image refuses the offer.
pub const DISK_FEATURE: &str = "virtio-blk";
/// How long an abandoned move waits for the destination to let go of the
/// disk's lock before the VM resumes here (it normally takes microseconds:
/// the destination's process closes the image as it gives up).
const DISK_RETAKE_PATIENCE: Duration = Duration::from_secs(10);

/// The VM the engine migrates, and its disk when that is copied with it.
pub struct VmSource<'a> {
    vm: &'a mut Vm,
    disk_copy: Option<Arc<SourceDisk>>,
}

impl<'a> VmSource<'a> {
    /// The VM alone: its disk, if any, is on storage both hosts share.
    pub fn new(vm: &'a mut Vm) -> VmSource<'a> {
        VmSource {
            vm,
            disk_copy: None,
        }
    }

    /// The VM with its disk copied to the destination (`--copy-storage`).
    pub fn copying_disk(vm: &'a mut Vm) -> Result<VmSource<'a>, String> {
        let disk = SourceDisk::open(vm)?;
        Ok(VmSource {
            vm,
            disk_copy: Some(Arc::new(disk)),
        })
    }

    /// What the disk copy did, once the migration is over.
    pub fn disk_copy_report(&self) -> Option<DiskCopyReport> {
        self.disk_copy.as_ref().map(|d| d.report())
    }
}

impl SourceGuest for VmSource<'_> {
    fn describe(&self) -> Result<Offer, GuestError> {
        let m = self.vm.machine();
        Ok(Offer {
            mem_bytes: m.mem_bytes,
            vcpus: m.vcpus,
            ram_ranges: m
                .ram_ranges
                .iter()
                .map(|&(gpa, len)| RamRange { gpa, len })
                .collect(),
            tsc_khz: m.tsc_khz,
            cpuid: encode_cpuid(self.vm.cpuid()),
            features: VM_FEATURES
                .iter()
                .copied()
                .chain(self.vm.net().map(|_| NET_FEATURE))
                .chain(self.vm.disk().map(|_| DISK_FEATURE))
                .map(str::to_string)
                .collect(),
            disks: self
                .vm
                .disk()
                .into_iter()
                .map(|(path, bytes, readonly)| DiskOffer {
                    path: path.display().to_string(),
                    bytes,
                    readonly,
                })
                .collect(),
            copies_disks: self.disk_copy.is_some(),
        })
    }

    fn populated(&self) -> Result<Vec<RamRange>, GuestError> {
        let mut ranges: Vec<RamRange> = self
            .vm
            .ram()
            .populated()?
            .into_iter()
            .map(|(gpa, len)| RamRange { gpa, len })
            .collect();
        if let Some(disk) = &self.disk_copy {
            ranges.extend(disk.populated()?);
        }
        Ok(ranges)
    }

    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_memory(self.vm.ram(), self.disk_copy.as_deref(), gpa, dst)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), GuestError> {
        self.vm.set_dirty_logging(on)?;
        if let Some(disk) = &self.disk_copy {
            disk.set_tracking(on);
        }
        Ok(())
    }

    fn harvest_dirty(&mut self) -> Result<PageBitmap, GuestError> {
        let dirty = self.vm.harvest_dirty()?;
        let mut ranges: Vec<RangeBits> = dirty
            .regions
            .into_iter()
            .map(|r| RangeBits {
                gpa: r.base,
                pages: r.pages,
                bits: r.bits,
            })
            .collect();
        // After the RAM, in the offer's order (`Offer::migrated_ranges`).
        if let Some(disk) = &self.disk_copy {
            ranges.push(disk.harvest());
        }
        Ok(PageBitmap { ranges })
    }

    fn hold_disk_writes(&mut self, on: bool) -> Result<bool, GuestError> {
        Ok(match &self.disk_copy {
            Some(disk) => {
                disk.hold_writes(on);
                true
            }
            None => false,
        })
    }

    fn round_sent(&mut self) {
        if let Some(disk) = &self.disk_copy {
            disk.round_sent();
        }
    }

    fn set_throttle(&mut self, percent: u32) -> Result<(), GuestError> {
        Ok(self.vm.set_throttle(percent)?)
    }

    fn pause(&mut self) -> Result<PauseTiming, GuestError> {
        // A write held for the copy would hold the device's pause, which
        // waits for the request it serves; the blackout sends the block.
        if let Some(disk) = &self.disk_copy {
            disk.hold_writes(false);
        }
        let paused = self.vm.pause()?;
        // From the blackout on, frames for the VM are kept, not given to
        // the guest: after a commit they go to the destination, after an
        // abort to the guest here.
        if let Some(net) = self.vm.net() {
            net.hold();
        }
        if let Some(disk) = &self.disk_copy {
            disk.set_paused(true);
        }
        Ok(PauseTiming {
            requested: paused.requested,
            all_stopped: paused.all_stopped,
        })
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        // The disk's lock first: the VM must not write an image the
        // destination may still hold.
        self.vm.retake_disk(DISK_RETAKE_PATIENCE).map_err(|e| {
            format!("its disk cannot be taken back ({e}); the VM stays paused so that two hosts never write it")
        })?;
        if let Some(net) = self.vm.net() {
            net.release();
        }
        if let Some(disk) = &self.disk_copy {
            disk.set_paused(false);
        }
        self.vm.resume();
        Ok(())
    }

    fn network_after_commit(&mut self) -> Option<Box<dyn SourceNetwork>> {
        let net = self.vm.net()?;
        Some(Box::new(NetSource::new(net)))
    }

    fn release_storage(&mut self) -> Result<bool, GuestError> {
        if self.disk_copy.is_some() {
            // The destination has its own image: this one stays locked
            // here, untouched, for the VM to go on with after an abort.
            // Its last writes were done when the pause returned (the
            // device finishes its request first), so the last harvest had
            // them.
            return Ok(false);
        }
        Ok(self.vm.release_disk()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(self.vm.save_state()?.encode())
    }

    fn memory_reader(&self) -> Result<Arc<dyn PageReader>, GuestError> {
        Ok(Arc::new(SharedMemory {
            ram: self.vm.ram().clone(),
            disk: self.disk_copy.clone(),
        }))
    }
}

/// Guest memory (and a copied disk's pages) for other threads: post-copy's
/// and the page-data streams'.
struct SharedMemory {
    ram: GuestRam,
    disk: Option<Arc<SourceDisk>>,
}

impl PageReader for SharedMemory {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_memory(&self.ram, self.disk.as_deref(), gpa, dst)
    }
}

fn read_memory(
    ram: &GuestRam,
    disk: Option<&SourceDisk>,
    gpa: u64,
    dst: &mut [u8],
) -> Result<(), GuestError> {
    if let Some(disk) = disk.filter(|_| SourceDisk::holds(gpa)) {
        return disk.read(gpa, dst);
    }
    if ram.copy_out(gpa, dst) {
        Ok(())
    } else {
        Err(format!("{} bytes at {gpa:#x} are not guest RAM", dst.len()).into())
    }
}
