//! What happens to VMs, as events for `GET /v1/events`, and the audit log:
//! every call that changes something, one JSON line under the state
//! directory. Each audit entry also goes out as an event.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use crate::model::VmState;

/// Who asked: on the Unix socket, what the kernel vouches for
/// (SO_PEERCRED); on the peer listener, the identity the verified client
/// certificate states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Caller {
    /// A local process.
    Local {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A peer with a certificate of the fleet's CA.
    Peer {
        /// `host` or `operator`.
        role: String,
        name: String,
        /// `ferry://ROLE/NAME`, as the certificate states it.
        uri: String,
    },
}

impl Caller {
    pub fn peer(id: &ferry_identity::PeerIdentity) -> Self {
        Self::Peer {
            role: id.role.as_str().to_owned(),
            name: id.name.clone(),
            uri: id.uri(),
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// RFC 3339, UTC.
    pub time: String,
    /// Who asked.
    pub who: Caller,
    /// What was asked: the method and route, e.g. `POST /v1/vms/{id}/pause`.
    pub action: String,
    pub vm: Option<String>,
    /// `ok`, or `refused` (bad input, conflict, no capacity: nothing
    /// changed), or `failed` (the agent or the VMM could not do it).
    pub outcome: String,
    /// The HTTP status answered (0 for a migration's own ending).
    pub status: u16,
    /// Why it was refused or failed.
    pub reason: Option<String>,
}

/// One event of `GET /v1/events` (the SSE `event:` field is its `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A VM's state changed.
    VmState {
        time: String,
        vm: String,
        state: VmState,
        reason: Option<String>,
    },
    /// A VM's record was removed.
    VmDeleted { time: String, vm: String },
    /// A VMM left running by a previous agent was taken over.
    VmAdopted { time: String, vm: String, pid: u32 },
    /// A migration job of this host changed phase.
    Migration {
        time: String,
        job: String,
        vm: String,
        phase: crate::migration::JobPhase,
        reason: Option<String>,
    },
    /// A VM now runs on another host; its record here is gone.
    VmMigrated {
        time: String,
        vm: String,
        to: String,
    },
    /// A call that changed (or tried to change) something.
    Audit(AuditEntry),
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::VmState { .. } => "vm_state",
            Self::VmDeleted { .. } => "vm_deleted",
            Self::VmAdopted { .. } => "vm_adopted",
            Self::Migration { .. } => "migration",
            Self::VmMigrated { .. } => "vm_migrated",
            Self::Audit(_) => "audit",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {}: {source}", .path.display())]
pub struct AuditOpenError {
    path: PathBuf,
    source: std::io::Error,
}

/// Publishes events and writes the audit log.
pub struct Events {
    /// None once the agent stops: every event stream then ends, so the
    /// server's graceful shutdown is not held up by open streams.
    tx: Mutex<Option<broadcast::Sender<Event>>>,
    audit: Mutex<File>,
}

impl Events {
    pub fn open(audit_log: &Path) -> Result<Self, AuditOpenError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(audit_log)
            .map_err(|source| AuditOpenError {
                path: audit_log.to_owned(),
                source,
            })?;
        let (tx, _) = broadcast::channel(1024);
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            audit: Mutex::new(file),
        })
    }

    /// A receiver of every event from now on (already closed once the
    /// agent stops).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match &*lock(&self.tx) {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    pub fn publish(&self, event: Event) {
        if let Some(tx) = &*lock(&self.tx) {
            // No subscriber is fine.
            let _ = tx.send(event);
        }
    }

    /// Ends every event stream.
    pub fn close(&self) {
        lock(&self.tx).take();
    }

    /// Appends `entry` to the audit log and publishes it.
    pub fn audit(&self, entry: AuditEntry) {
        let mut line = serde_json::to_string(&entry).unwrap_or_default();
        line.push('\n');
        let mut file = lock(&self.audit);
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!("cannot write the audit log: {e}");
        }
        drop(file);
        self.publish(Event::Audit(entry));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
