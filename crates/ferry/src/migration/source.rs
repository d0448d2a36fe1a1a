//! A running VM as the migration engine's source.

use ferry_migration::bitmap::{PageBitmap, RangeBits};
use std::sync::Arc;
use std::time::Duration;

use ferry_migration::guest::{GuestError, PageReader, PauseTiming, SourceGuest};
use ferry_migration::handover::SourceNetwork;

use super::network::NetSource;
use ferry_migration::protocol::{DiskOffer, Offer, RamRange};
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

pub struct VmSource<'a>(pub &'a mut Vm);

impl SourceGuest for VmSource<'_> {
    fn describe(&self) -> Result<Offer, GuestError> {
        let m = self.0.machine();
        Ok(Offer {
            mem_bytes: m.mem_bytes,
            vcpus: m.vcpus,
            ram_ranges: m
                .ram_ranges
                .iter()
                .map(|&(gpa, len)| RamRange { gpa, len })
                .collect(),
            tsc_khz: m.tsc_khz,
            cpuid: encode_cpuid(self.0.cpuid()),
            features: VM_FEATURES
                .iter()
                .copied()
                .chain(self.0.net().map(|_| NET_FEATURE))
                .chain(self.0.disk().map(|_| DISK_FEATURE))
                .map(str::to_string)
                .collect(),
            disks: self
                .0
                .disk()
                .into_iter()
                .map(|(path, bytes, readonly)| DiskOffer {
                    path: path.display().to_string(),
                    bytes,
                    readonly,
                })
                .collect(),
        })
    }

    fn populated(&self) -> Result<Vec<RamRange>, GuestError> {
        Ok(self
            .0
            .ram()
            .populated()?
            .into_iter()
            .map(|(gpa, len)| RamRange { gpa, len })
            .collect())
    }

    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_ram(self.0.ram(), gpa, dst)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), GuestError> {
        Ok(self.0.set_dirty_logging(on)?)
    }

    fn harvest_dirty(&mut self) -> Result<PageBitmap, GuestError> {
        let dirty = self.0.harvest_dirty()?;
        Ok(PageBitmap {
            ranges: dirty
                .regions
                .into_iter()
                .map(|r| RangeBits {
                    gpa: r.base,
                    pages: r.pages,
                    bits: r.bits,
                })
                .collect(),
        })
    }

    fn set_throttle(&mut self, percent: u32) -> Result<(), GuestError> {
        Ok(self.0.set_throttle(percent)?)
    }

    fn pause(&mut self) -> Result<PauseTiming, GuestError> {
        let paused = self.0.pause()?;
        // From the blackout on, frames for the VM are kept, not given to
        // the guest: after a commit they go to the destination, after an
        // abort to the guest here.
        if let Some(net) = self.0.net() {
            net.hold();
        }
        Ok(PauseTiming {
            requested: paused.requested,
            all_stopped: paused.all_stopped,
        })
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        // The disk's lock first: the VM must not write an image the
        // destination may still hold.
        self.0.retake_disk(DISK_RETAKE_PATIENCE).map_err(|e| {
            format!("its disk cannot be taken back ({e}); the VM stays paused so that two hosts never write it")
        })?;
        if let Some(net) = self.0.net() {
            net.release();
        }
        self.0.resume();
        Ok(())
    }

    fn network_after_commit(&mut self) -> Option<Box<dyn SourceNetwork>> {
        let net = self.0.net()?;
        Some(Box::new(NetSource::new(net)))
    }

    fn release_storage(&mut self) -> Result<bool, GuestError> {
        Ok(self.0.release_disk()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(self.0.save_state()?.encode())
    }

    fn memory_reader(&self) -> Result<Arc<dyn PageReader>, GuestError> {
        Ok(Arc::new(SharedRam(self.0.ram().clone())))
    }
}

/// Guest memory for other threads: post-copy's and the page-data streams'.
struct SharedRam(GuestRam);

impl PageReader for SharedRam {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_ram(&self.0, gpa, dst)
    }
}

fn read_ram(ram: &GuestRam, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
    if ram.copy_out(gpa, dst) {
        Ok(())
    } else {
        Err(format!("{} bytes at {gpa:#x} are not guest RAM", dst.len()).into())
    }
}
