//! Reading a snapshot: the metadata first, checked completely (state record,
//! every memory run against the VM's RAM map, the exact file size) before
//! the caller builds anything; then memory by direct I/O straight into the
//! new VM's RAM, and the trailer's checksum before any vCPU may run.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::aligned::{open_direct, round_up, AlignedBuf, BLOCK};
use super::*;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page_runs::MAX_RUN_BYTES;
use crate::state::{codec::MAX_RECORD_BYTES, MachineConfig, StateRecord};

/// More runs than this cannot come from any VM Ferry makes.
const MAX_RUNS: u64 = 1 << 26;

/// The memory part of a snapshot whose metadata has been read and checked.
pub struct SnapshotMemory {
    path: PathBuf,
    file: File,
    direct_io: bool,
    runs: Vec<(u64, u64)>,
    data_offset: u64,
    state_bytes: u64,
    file_bytes: u64,
}

/// Reads and checks a snapshot's metadata; its memory is loaded later,
/// into the VM built from the returned record.
pub fn read_snapshot(path: &Path) -> Result<(StateRecord, SnapshotMemory), SnapshotError> {
    let (file, direct_io) =
        open_direct(path, OpenOptions::new().read(true)).map_err(|source| SnapshotError::Open {
            path: path.to_owned(),
            source,
        })?;
    let rerr = |source| SnapshotError::Read {
        path: path.to_owned(),
        source,
    };
    let file_bytes = file.metadata().map_err(rerr)?.len();
    let mut first = AlignedBuf::zeroed(BLOCK);
    let got = read_at_most(&file, first.as_mut_slice(), 0).map_err(rerr)?;
    let h = first.as_slice();
    if got >= 8 && &h[..8] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_owned(),
        });
    }
    if got < HEADER_BYTES {
        return Err(truncated(path, "header"));
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found: version,
            supported: VERSION,
        });
    }
    let state_len = u64_at(h, 16);
    let run_count = u64_at(h, 24);
    let data_offset = u64_at(h, 32);
    if u32_at(h, 12) != 0 || u32_at(h, 44) != 0 {
        return Err(corrupt(path, "unknown header flags"));
    }
    if state_len > MAX_RECORD_BYTES as u64 || run_count > MAX_RUNS {
        return Err(corrupt(path, "metadata lengths out of range"));
    }
    let meta_len = HEADER_BYTES as u64 + state_len + run_count * RUN_ENTRY_BYTES as u64;
    if data_offset != round_up(meta_len) {
        return Err(corrupt(path, "metadata lengths are inconsistent"));
    }
    if file_bytes < data_offset {
        return Err(truncated(path, "metadata"));
    }
    let mut meta = AlignedBuf::zeroed(data_offset as usize);
    read_exact_at(&file, meta.as_mut_slice(), 0, path, "metadata")?;
    let m = meta.as_slice();
    if metadata_crc(m) != u32_at(m, CRC_AT) {
        return Err(corrupt(
            path,
            "metadata checksum mismatch (header, state or memory index)",
        ));
    }
    let state_end = HEADER_BYTES + state_len as usize;
    let record = StateRecord::decode(&m[HEADER_BYTES..state_end]).map_err(|source| {
        SnapshotError::State {
            path: path.to_owned(),
            source,
        }
    })?;
    let runs: Vec<(u64, u64)> = (0..run_count as usize)
        .map(|i| {
            let at = state_end + i * RUN_ENTRY_BYTES;
            (u64_at(m, at), u64_at(m, at + 8))
        })
        .collect();
    let data_bytes = check_runs(&runs, &record.config).map_err(|what| corrupt(path, what))?;
    let expected = data_offset + data_bytes + BLOCK as u64;
    if file_bytes < data_offset + data_bytes {
        return Err(truncated(path, "memory"));
    }
    if file_bytes < expected {
        return Err(truncated(path, "trailer"));
    }
    if file_bytes > expected {
        return Err(corrupt(
            path,
            format!("{} bytes after the trailer", file_bytes - expected),
        ));
    }
    let memory = SnapshotMemory {
        path: path.to_owned(),
        file,
        direct_io,
        runs,
        data_offset,
        state_bytes: state_len,
        file_bytes,
    };
    Ok((record, memory))
}

/// Every run must be whole pages, bounded, ascending without overlap, and
/// inside one RAM range of the recorded VM; returns their total size.
fn check_runs(runs: &[(u64, u64)], config: &MachineConfig) -> Result<u64, String> {
    let mut next_free = 0u64;
    let mut total = 0u64;
    for &(gpa, len) in runs {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 || len > MAX_RUN_BYTES {
            return Err(format!(
                "memory run {gpa:#x}+{len:#x} is not a bounded run of whole pages"
            ));
        }
        if gpa < next_free {
            return Err(format!(
                "memory run {gpa:#x} overlaps or precedes the previous one"
            ));
        }
        let end = gpa.checked_add(len).ok_or("memory run overflows")?;
        if !config
            .ram_ranges
            .iter()
            .any(|&(start, size)| start <= gpa && end <= start + size)
        {
            return Err(format!(
                "memory run {gpa:#x}+{len:#x} lies outside the VM's RAM"
            ));
        }
        next_free = end;
        total += len;
    }
    Ok(total)
}

impl SnapshotMemory {
    /// Reads every run into `memory` (fresh RAM of the recorded shape) and
    /// checks the trailer. The VM must not run yet.
    pub fn load_memory(self, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        let path = &self.path;
        let mut crc = crc32fast::Hasher::new();
        let mut offset = self.data_offset;
        for &(gpa, len) in &self.runs {
            let region = memory
                .iter()
                .find(|r| r.start_addr().0 <= gpa && gpa + len <= r.start_addr().0 + r.len())
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!("memory run {gpa:#x} is outside this VM's RAM"),
                    )
                })?;
            // SAFETY: [gpa, gpa+len) lies inside this region's live mapping
            // (checked just above); no vCPU runs yet and runs never overlap
            // (checked when the index was read), so this is the only
            // reference to those bytes while it lives.
            let target = unsafe {
                std::slice::from_raw_parts_mut(
                    region.as_ptr().add((gpa - region.start_addr().0) as usize),
                    len as usize,
                )
            };
            read_exact_at(&self.file, target, offset, path, "memory")?;
            crc.update(target);
            offset += len;
        }
        let mut trailer = AlignedBuf::zeroed(BLOCK);
        read_exact_at(&self.file, trailer.as_mut_slice(), offset, path, "trailer")?;
        let t = trailer.as_slice();
        let pages = (offset - self.data_offset) / PAGE_SIZE;
        if &t[..8] != END_MAGIC || t[20..].iter().any(|&b| b != 0) {
            return Err(corrupt(path, "bad trailer"));
        }
        if u64_at(t, 8) != pages {
            return Err(corrupt(
                path,
                format!("trailer says {} pages, the index {pages}", u64_at(t, 8)),
            ));
        }
        if u32_at(t, 16) != crc.finalize() {
            return Err(corrupt(path, "memory checksum mismatch"));
        }
        Ok(SnapshotStats {
            state_bytes: self.state_bytes,
            memory_bytes: pages * PAGE_SIZE,
            pages_written: pages,
            zero_pages_skipped: 0,
            file_bytes: self.file_bytes,
            direct_io: self.direct_io,
            copy_ms: t0.elapsed().as_secs_f64() * 1e3,
            fsync_ms: 0.0,
        })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
    what: &'static str,
) -> Result<(), SnapshotError> {
    let got = read_at_most(file, buf, offset).map_err(|source| SnapshotError::Read {
        path: path.to_owned(),
        source,
    })?;
    if got < buf.len() {
        return Err(truncated(path, what));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn truncated(path: &Path, what: &'static str) -> SnapshotError {
    SnapshotError::Truncated {
        path: path.to_owned(),
        what,
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_owned(),
        what: what.into(),
    }
}
