//! Reading a snapshot: the header and state record first (so the caller can
//! check the VM's shape before building anything), then memory straight
//! into the new VM's RAM, every chunk checked against its memory map.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::page_runs::MAX_RUN_BYTES;
use crate::state::{codec::MAX_RECORD_BYTES, StateRecord};

/// The memory part of a snapshot whose state has been read and checked.
pub struct SnapshotMemory {
    path: PathBuf,
    input: BufReader<File>,
    state_bytes: u64,
}

/// Reads and checks a snapshot's header and state record; its memory is
/// loaded later, into the VM built from that record.
pub fn read_snapshot(path: &Path) -> Result<(StateRecord, SnapshotMemory), SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER_BYTES];
    read_exact(&mut input, &mut header, path, "header")?;
    if &header[..8] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found: version,
            supported: VERSION,
        });
    }
    let flags = u32::from_le_bytes(header[12..16].try_into().unwrap());
    let state_len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if flags != 0 || header[24..].iter().any(|&b| b != 0) {
        return Err(corrupt(path, "unknown header flags"));
    }
    if state_len > MAX_RECORD_BYTES as u64 {
        return Err(corrupt(
            path,
            format!("state record length {state_len} exceeds {MAX_RECORD_BYTES}"),
        ));
    }
    let mut state = vec![0u8; state_len as usize];
    read_exact(&mut input, &mut state, path, "state record")?;
    let record = StateRecord::decode(&state).map_err(|source| SnapshotError::State {
        path: path.to_owned(),
        source,
    })?;
    let memory = SnapshotMemory {
        path: path.to_owned(),
        input,
        state_bytes: state_len,
    };
    Ok((record, memory))
}

impl SnapshotMemory {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every memory chunk into `memory` (fresh, zeroed RAM of the
    /// recorded shape) and checks the trailer. The VM must not run yet.
    pub fn load_memory(mut self, memory: &GuestMemory) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        let path = self.path.clone();
        let mut crc = crc32fast::Hasher::new();
        let mut next_free = 0u64;
        let mut pages = 0u64;
        loop {
            let mut head = [0u8; CHUNK_HEADER_BYTES];
            read_exact(&mut self.input, &mut head, &path, "memory chunk header")?;
            crc.update(&head);
            let gpa = u64::from_le_bytes(head[..8].try_into().unwrap());
            let len = u64::from_le_bytes(head[8..].try_into().unwrap());
            if gpa == END_OF_MEMORY && len == 0 {
                break;
            }
            let host =
                chunk_target(memory, gpa, len, next_free).map_err(|what| corrupt(&path, what))?;
            // SAFETY: chunk_target proved [host, host+len) lies inside a live
            // RAM mapping; no vCPU runs yet and chunks never overlap, so this
            // is the only reference to those bytes while it lives.
            let target = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
            read_exact(&mut self.input, target, &path, "memory chunk")?;
            crc.update(target);
            next_free = gpa + len;
            pages += len / PAGE_SIZE;
        }
        let mut trailer = [0u8; TRAILER_BYTES];
        read_exact(&mut self.input, &mut trailer, &path, "trailer")?;
        let recorded_pages = u64::from_le_bytes(trailer[..8].try_into().unwrap());
        let recorded_crc = u32::from_le_bytes(trailer[8..12].try_into().unwrap());
        if &trailer[12..] != END_MAGIC {
            return Err(corrupt(&path, "bad end marker"));
        }
        if recorded_crc != crc.finalize() {
            return Err(corrupt(&path, "memory checksum mismatch"));
        }
        if recorded_pages != pages {
            return Err(corrupt(
                &path,
                format!("trailer says {recorded_pages} pages, file holds {pages}"),
            ));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(corrupt(&path, "bytes after the end marker")),
            Err(source) => return Err(SnapshotError::Read { path, source }),
        }
        let file_bytes = self
            .input
            .get_ref()
            .metadata()
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(SnapshotStats {
            state_bytes: self.state_bytes,
            memory_bytes: pages * PAGE_SIZE,
            pages_written: pages,
            zero_pages_skipped: 0,
            file_bytes,
            copy_ms: t0.elapsed().as_secs_f64() * 1e3,
            fsync_ms: 0.0,
        })
    }
}

/// The guest RAM a chunk goes to, once it is proven to lie inside one RAM
/// region, page-aligned, bounded, and after the previous chunk.
fn chunk_target(
    memory: &GuestMemory,
    gpa: u64,
    len: u64,
    next_free: u64,
) -> Result<*mut u8, String> {
    if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 || len > MAX_RUN_BYTES {
        return Err(format!(
            "memory chunk {gpa:#x}+{len:#x} is not a bounded run of whole pages"
        ));
    }
    if gpa < next_free {
        return Err(format!(
            "memory chunk {gpa:#x} overlaps or precedes the previous one"
        ));
    }
    let region = memory
        .iter()
        .find(|r| r.start_addr().0 <= gpa && gpa + len <= r.start_addr().0 + r.len())
        .ok_or_else(|| format!("memory chunk {gpa:#x}+{len:#x} lies outside the VM's RAM"))?;
    let offset = (gpa - region.start_addr().0) as usize;
    // SAFETY: offset is inside the region's mapping (checked above).
    Ok(unsafe { region.as_ptr().add(offset) })
}

fn read_exact(
    input: &mut impl Read,
    buf: &mut [u8],
    path: &Path,
    what: &'static str,
) -> Result<(), SnapshotError> {
    input.read_exact(buf).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                path: path.to_owned(),
                what,
            }
        } else {
            SnapshotError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn corrupt(path: &Path, what: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_owned(),
        what: what.into(),
    }
}
