//! The destination's judgement of the offered VM's disk on shared storage:
//! this host must be given the image (`--disk path=IMG`), in the same mode,
//! and it must be the image the VM runs on: the source holds that image's
//! lock until the pause, so an image nobody holds is another image, seen
//! through another path or on storage this host does not share.

use ferry_migration::protocol::Offer;
use ferry_vmm::devices::block::device::BlockConfig;
use ferry_vmm::devices::block::lock::{probe, LockState};

/// The disk to open for the offered VM and the size it must have; None for
/// a VM without a disk. Err is the reason the source is told.
pub fn judge(
    offer: &Offer,
    disk: Option<&BlockConfig>,
) -> Result<Option<(BlockConfig, u64)>, String> {
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
    Ok(Some((disk.clone(), offered.bytes)))
}
