//! The destination's judgement of the offered VM's disk. On shared storage
//! this host must be given the image (`--disk path=IMG`), in the same mode,
//! and it must be the image the VM runs on: the source holds that image's
//! lock until the pause, so an image nobody holds is another image, seen
//! through another path or on storage this host does not share. A disk the
//! source copies (`--copy-storage`) arrives in a new image this host makes
//! at its `--disk` path, which must not exist yet.

use ferry_migration::protocol::{DiskOffer, Offer};
use ferry_vmm::devices::block::copy_target::left_by_dead_receiver;
use ferry_vmm::devices::block::device::BlockConfig;
use ferry_vmm::devices::block::lock::{probe, LockState};

/// Where the offered VM's disk will be here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlan {
    /// The image on shared storage, of this size.
    Shared(BlockConfig, u64),
    /// A new image at this path, of this size, that the copy fills.
    Copied(BlockConfig, u64),
}

/// The disk to open for the offered VM; None for a VM without a disk. Err
/// is the reason the source is told.
pub fn judge(offer: &Offer, disk: Option<&BlockConfig>) -> Result<Option<DiskPlan>, String> {
    let offered = match (offer.disks.as_slice(), disk) {
        ([], None) => return Ok(None),
        ([], Some(d)) => {
            return Err(format!(
            "the VM has no disk, but this destination was given one ({}); start it without --disk",
            d.path.display()
        ))
        }
        ([offered], _) => offered,
        (many, _) => {
            return Err(format!(
                "the VM has {} disks; Ferry moves VMs with one",
                many.len()
            ))
        }
    };
    if offer.copies_disks {
        let Some(disk) = disk else {
            return Err(format!(
                "the source copies the VM's disk ({} bytes) and this destination has no place for it: give --disk path=IMG, a new file this host creates",
                offered.bytes
            ));
        };
        return judge_copied(offered, disk).map(Some);
    }
    let Some(disk) = disk else {
        return Err(format!(
            "the VM has a disk ({} bytes, image {} on the source) and this destination has none: give it the same image on shared storage with --disk path=IMG",
            offered.bytes, offered.path
        ));
    };
    if offered.readonly != disk.readonly {
        let mode = |ro: bool| if ro { "read-only" } else { "writable" };
        return Err(format!(
            "the VM's disk is {} on the source and {} here ({}); give --disk the same mode",
            mode(offered.readonly),
            mode(disk.readonly),
            disk.path.display()
        ));
    }
    if !disk.path.exists() {
        return Err(format!(
            "disk image {} does not exist on this host (the VM's is {} on the source): is the shared storage mounted here?",
            disk.path.display(),
            offered.path
        ));
    }
    let state = probe(&disk.path).map_err(|e| format!("the VM's disk here: {e}"))?;
    if state == LockState::Free {
        return Err(format!(
            "nobody holds the lock of {} here, so it is not the image the VM runs on ({} on the source): this host does not see the source's storage, or the path names another file",
            disk.path.display(),
            offered.path
        ));
    }
    Ok(Some(DiskPlan::Shared(disk.clone(), offered.bytes)))
}

/// A copied disk: its image is made here, so nothing may be there yet
/// (Ferry never writes over a file) but the partial copy a dead receiver
/// left, and its directory must exist.
fn judge_copied(offered: &DiskOffer, disk: &BlockConfig) -> Result<DiskPlan, String> {
    let replaced = left_by_dead_receiver(&disk.path).map_err(|e| e.to_string())?;
    if disk.path.exists() && !replaced {
        return Err(format!(
            "the source copies the VM's disk, and {} exists here already: Ferry never writes over a file; give --disk a new path (or use shared storage without --copy-storage)",
            disk.path.display()
        ));
    }
    let dir = match disk.path.parent() {
        Some(p) if p.as_os_str().is_empty() => std::path::Path::new("."),
        Some(p) => p,
        None => std::path::Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(format!(
            "the copied disk's image {} cannot be made here: {} is not a directory",
            disk.path.display(),
            dir.display()
        ));
    }
    Ok(DiskPlan::Copied(disk.clone(), offered.bytes))
}
