//! The commands a running VM's owner accepts from outside (an API socket or
//! the CLI), and their answers. No transport here: the binary carries these
//! as JSON lines over a Unix socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::snapshot::SnapshotReport;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// What is running here.
    Status,
    /// Pause, write a snapshot to `path`, then resume (or stop).
    Snapshot { path: PathBuf, stop: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        vcpus: u32,
        mem_bytes: u64,
        uptime_ms: f64,
    },
    Snapshot(SnapshotReport),
    Error {
        message: String,
    },
}
