//! Writing a snapshot: temporary file, big sequential writes straight from
//! guest memory, fsync, rename, fsync of the directory.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| SnapshotError::Create {
            path: tmp.clone(),
            source,
        })?;
    // SAFETY: the caller guarantees guest memory is quiescent.
    let result = unsafe { write_all(file, &tmp, state, memory) }.and_then(|stats| {
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

/// # Safety
/// As `write_snapshot`.
unsafe fn write_all(
    file: File,
    tmp: &Path,
    state: &[u8],
    memory: &GuestMemory,
) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let werr = |source| SnapshotError::Write {
        path: tmp.to_owned(),
        source,
    };
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(state.len() as u64).to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes());
    out.write_all(&header).map_err(werr)?;
    out.write_all(state).map_err(werr)?;

    let mut crc = crc32fast::Hasher::new();
    let mut pages = 0u64;
    let mut memory_bytes = 0u64;
    // SAFETY: the caller guarantees guest memory is quiescent.
    let zero_pages = unsafe {
        for_each_nonzero_run(memory, |run| {
            let mut head = [0u8; CHUNK_HEADER_BYTES];
            head[..8].copy_from_slice(&run.gpa.to_le_bytes());
            head[8..].copy_from_slice(&(run.bytes.len() as u64).to_le_bytes());
            crc.update(&head);
            crc.update(run.bytes);
            pages += run.bytes.len() as u64 / PAGE_SIZE;
            memory_bytes += run.bytes.len() as u64;
            out.write_all(&head)?;
            out.write_all(run.bytes)
        })
    }
    .map_err(werr)?;
    let mut end = [0u8; CHUNK_HEADER_BYTES];
    end[..8].copy_from_slice(&END_OF_MEMORY.to_le_bytes());
    crc.update(&end);
    out.write_all(&end).map_err(werr)?;
    out.write_all(&pages.to_le_bytes()).map_err(werr)?;
    out.write_all(&crc.finalize().to_le_bytes()).map_err(werr)?;
    out.write_all(END_MAGIC).map_err(werr)?;
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
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
        copy_ms,
        fsync_ms,
    })
}
