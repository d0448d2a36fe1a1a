//! Writing a snapshot: scan memory for non-zero runs, write the metadata,
//! then every run straight from guest RAM by direct I/O, the trailer,
//! fsync, rename, and fsync of the directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::aligned::{open_direct, round_up, AlignedBuf, BLOCK};
use super::*;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page_runs::for_each_nonzero_run;

/// Writes `state` (an encoded state record) and the non-zero pages of
/// `memory` to `path`. On any error the temporary file is removed and
/// nothing exists under `path` that was not there before.
///
/// # Safety
/// Nothing may write guest memory while this runs: pause the VM first.
pub unsafe fn write_snapshot(
    path: &Path,
    state: &[u8],
    memory: &GuestMemory,
) -> Result<SnapshotStats, SnapshotError> {
    let tmp = temp_name(path);
    let (file, direct_io) = open_direct(&tmp, OpenOptions::new().write(true).create_new(true))
        .map_err(|source| SnapshotError::Create {
            path: tmp.clone(),
            source,
        })?;
    // SAFETY: the caller guarantees guest memory is quiescent.
    let result = unsafe { write_all(file, direct_io, &tmp, state, memory) }.and_then(|stats| {
        std::fs::rename(&tmp, path).map_err(|source| SnapshotError::Write {
            path: path.to_owned(),
            source,
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| SnapshotError::Write {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        Ok(stats)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

struct Run {
    gpa: u64,
    host: *const u8,
    len: usize,
}

/// # Safety
/// As `write_snapshot`.
unsafe fn write_all(
    mut file: File,
    direct_io: bool,
    tmp: &Path,
    state: &[u8],
    memory: &GuestMemory,
) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let werr = |source| SnapshotError::Write {
        path: tmp.to_owned(),
        source,
    };
    let mut runs = Vec::new();
    // SAFETY: the caller guarantees guest memory is quiescent, so the runs
    // found now still hold the same bytes when they are written below.
    let zero_pages = unsafe {
        for_each_nonzero_run::<()>(memory, |run| {
            runs.push(Run {
                gpa: run.gpa,
                host: run.bytes.as_ptr(),
                len: run.bytes.len(),
            });
            Ok(())
        })
    }
    .unwrap_or_default();

    let meta_len = HEADER_BYTES + state.len() + runs.len() * RUN_ENTRY_BYTES;
    let data_offset = round_up(meta_len as u64);
    let mut meta = AlignedBuf::zeroed(data_offset as usize);
    {
        let m = meta.as_mut_slice();
        m[..8].copy_from_slice(MAGIC);
        m[8..12].copy_from_slice(&VERSION.to_le_bytes());
        m[16..24].copy_from_slice(&(state.len() as u64).to_le_bytes());
        m[24..32].copy_from_slice(&(runs.len() as u64).to_le_bytes());
        m[32..40].copy_from_slice(&data_offset.to_le_bytes());
        m[HEADER_BYTES..HEADER_BYTES + state.len()].copy_from_slice(state);
        let mut at = HEADER_BYTES + state.len();
        for run in &runs {
            m[at..at + 8].copy_from_slice(&run.gpa.to_le_bytes());
            m[at + 8..at + 16].copy_from_slice(&(run.len as u64).to_le_bytes());
            at += RUN_ENTRY_BYTES;
        }
        let crc = metadata_crc(m);
        m[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }
    file.write_all(meta.as_slice()).map_err(werr)?;

    let mut crc = crc32fast::Hasher::new();
    let mut memory_bytes = 0u64;
    for run in &runs {
        // SAFETY: the run came from `for_each_nonzero_run` over live,
        // quiescent guest RAM; it is page-aligned, so direct I/O can use it.
        let bytes = unsafe { std::slice::from_raw_parts(run.host, run.len) };
        crc.update(bytes);
        file.write_all(bytes).map_err(werr)?;
        memory_bytes += run.len as u64;
    }
    let pages = memory_bytes / PAGE_SIZE;
    let mut trailer = AlignedBuf::zeroed(BLOCK);
    {
        let t = trailer.as_mut_slice();
        t[..8].copy_from_slice(END_MAGIC);
        t[8..16].copy_from_slice(&pages.to_le_bytes());
        t[16..20].copy_from_slice(&crc.finalize().to_le_bytes());
    }
    file.write_all(trailer.as_slice()).map_err(werr)?;
    let copy_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    file.sync_all().map_err(werr)?;
    let fsync_ms = t1.elapsed().as_secs_f64() * 1e3;
    let file_bytes = file.metadata().map_err(werr)?.len();
    Ok(SnapshotStats {
        state_bytes: state.len() as u64,
        memory_bytes,
        pages_written: pages,
        zero_pages_skipped: zero_pages,
        file_bytes,
        direct_io,
        copy_ms,
        fsync_ms,
    })
}
