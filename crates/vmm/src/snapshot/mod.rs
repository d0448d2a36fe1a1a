//! Snapshot files: a VM's state record and its non-zero memory, written
//! under a temporary name, fsynced and renamed, so a crash never leaves a
//! half file under the final name. Everything read back is checked before
//! any of it is trusted: lengths are capped, every memory chunk must lie in
//! the VM's RAM in ascending order, and a CRC covers all memory.
//!
//! ```text
//! header   "FERRYSNP" | u32 version | u32 flags (0) | u64 state_len | u64 reserved
//! state    state_len bytes: the state record (its own sections and CRCs)
//! memory   { u64 gpa | u64 len | len bytes }*  then  u64::MAX | 0
//! trailer  u64 pages | u32 crc32 of the memory part | "FERRYEND"
//! ```

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
const HEADER_BYTES: usize = 32;
const CHUNK_HEADER_BYTES: usize = 16;
const TRAILER_BYTES: usize = 8 + 4 + 8;
const END_OF_MEMORY: u64 = u64::MAX;

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
    /// Time spent on the memory and state, not counting fsync.
    pub copy_ms: f64,
    pub fsync_ms: f64,
}
