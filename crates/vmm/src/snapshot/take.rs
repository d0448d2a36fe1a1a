//! Taking a snapshot of a running VM: pause, save state, write state and
//! memory, then resume (or stop). A failed write never costs the VM: it
//! resumes and the error is reported.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{write_snapshot, SnapshotStats};
use crate::vm::{Vm, VmError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    /// From the pause request to the vCPUs running again (or being stopped).
    pub pause_ms: f64,
    pub save_state_ms: f64,
    /// Memory and state to the file, excluding fsync.
    pub write_ms: f64,
    pub fsync_ms: f64,
    pub stats: SnapshotStats,
    /// Bytes of file per second over write and fsync.
    pub write_mib_per_s: f64,
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeSnapshotError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    File(#[from] super::SnapshotError),
    #[error("a VM with a disk is snapshotted only with --stop: a VM that runs on keeps writing its disk, and the snapshot would no longer match the image it is restored on")]
    DiskNeedsStop,
}

pub fn take_snapshot(
    vm: &mut Vm,
    path: &Path,
    stop: bool,
) -> Result<SnapshotReport, TakeSnapshotError> {
    if vm.disk().is_some() && !stop {
        return Err(TakeSnapshotError::DiskNeedsStop);
    }
    let t0 = Instant::now();
    vm.pause()?;
    let outcome = (|| {
        // The image must hold every write the saved state knows of.
        vm.flush_disk()?;
        let t_state = Instant::now();
        let state = vm.save_state()?.encode();
        let save_state_ms = t_state.elapsed().as_secs_f64() * 1e3;
        // SAFETY: every vCPU is parked (pause returned) and no device
        // writes guest memory on its own, so memory is quiescent.
        let stats = unsafe { write_snapshot(path, &state, vm.memory()) }?;
        Ok::<_, TakeSnapshotError>((save_state_ms, stats))
    })();
    let stopped = stop && outcome.is_ok();
    if stopped {
        vm.stop();
    } else {
        vm.resume();
    }
    let pause_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (save_state_ms, stats) = outcome?;
    let secs = (stats.copy_ms + stats.fsync_ms) / 1e3;
    Ok(SnapshotReport {
        path: path.to_owned(),
        pause_ms,
        save_state_ms,
        write_ms: stats.copy_ms,
        fsync_ms: stats.fsync_ms,
        write_mib_per_s: if secs > 0.0 {
            stats.file_bytes as f64 / (1 << 20) as f64 / secs
        } else {
            0.0
        },
        stats,
        stopped,
    })
}
