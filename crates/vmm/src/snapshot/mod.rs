//! Snapshot files: a VM's state record and its non-zero memory, written
//! under a temporary name, fsynced and renamed, so a crash never leaves a
//! half file under the final name. The layout keeps memory page-aligned in
//! the file so it moves by direct I/O straight between disk and guest RAM.
//! Everything read back is checked before any of it is trusted: lengths are
//! capped, the index of memory runs must lie in the VM's RAM in ascending
//! order, the file's size must be exactly what the index says, and CRCs
//! cover the metadata and all memory.
//!
//! ```text
//! metadata  "FERRYSNP" | u32 version | u32 flags (0) | u64 state_len | u64 runs
//!           | u64 data_offset | u32 crc32 (of the metadata, this field as 0) | u32 0
//!           | state record (state_len bytes) | runs x { u64 gpa | u64 len }
//!           | zero padding to data_offset (a multiple of 4 KiB)
//! data      the runs' bytes, back to back (each a multiple of 4 KiB)
//! trailer   one 4 KiB block: "FERRYEND" | u64 pages | u32 crc32 of data | zeros
//! ```

mod aligned;
mod read;
mod take;
mod write;

pub use read::{read_snapshot, SnapshotMemory};
pub use take::{take_snapshot, SnapshotReport};
pub use write::write_snapshot;

use std::path::PathBuf;

use crate::state::StateError;

pub const MAGIC: &[u8; 8] = b"FERRYSNP";
pub const END_MAGIC: &[u8; 8] = b"FERRYEND";
pub const VERSION: u32 = 1;
const HEADER_BYTES: usize = 48;
const CRC_AT: usize = 40;
const RUN_ENTRY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path} failed: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open snapshot {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading snapshot {path} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Ferry snapshot (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path} is snapshot format {found}; this Ferry reads format {supported}")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} is truncated ({what})")]
    Truncated { path: PathBuf, what: &'static str },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    State { path: PathBuf, source: StateError },
}

/// What writing or reading a snapshot did, for the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotStats {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub pages_written: u64,
    pub zero_pages_skipped: u64,
    pub file_bytes: u64,
    /// Whether memory moved by direct I/O (O_DIRECT) or via the page cache.
    pub direct_io: bool,
    /// Time spent on the memory and state, not counting fsync.
    pub copy_ms: f64,
    pub fsync_ms: f64,
}

/// The metadata block's CRC: over all of it, with the CRC field as zero.
fn metadata_crc(meta: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&meta[..CRC_AT]);
    crc.update(&[0; 4]);
    crc.update(&meta[CRC_AT + 4..]);
    crc.finalize()
}
