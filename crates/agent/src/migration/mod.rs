//! Migrations between agents, as jobs.
//!
//! # Sequence
//! ```text
//! operator          source agent                 destination agent         receiver VMM
//!   POST /v1/vms/X/migrations
//!   <- 202 job          take X's op lock
//!                       POST /v1/peer/migrations (mTLS, offer) ->
//!                                                 reserve in the ledger (503: nothing starts)
//!                                                 spawn `ferry receive` ---> listens
//!                       <- 201 {address, token}   watch its log and exit
//!                       Request::Migrate to X's VMM, progress recorded
//!                       source VMM ==========================================> data plane
//!                                                 "VM received" in its log:
//!                                                 adopt it as a record
//!                       <- Migrated; GET /v1/peer/migrations/ID until committed
//!                       remove X's record
//! ```
//! On any failure or cancel before the commit the source VM runs on and
//! the source agent calls `DELETE /v1/peer/migrations/ID`: the receiver is
//! stopped and the reservation released. A destination left without news
//! (the source agent died) releases it when the policy's completion
//! timeout plus a grace has passed without a commit.
//!
//! The destination learns the outcome from its own receiver (its log
//! says when the VM was received and runs there; its exit says it did
//! not), not from the source: the receiver is where the truth is, and it
//! holds even when the source agent dies right after the commit.
//!
//! # Files
//! [`job`] is what an operator asks for and sees of an outgoing migration;
//! [`source`] runs it, [`outcome`] ends it on the source, [`cancel`]
//! stops it. [`destination`] is what a source asks the destination for;
//! [`prepare`] reserves and starts the receiver, [`arrival`] follows it
//! until the VM runs here or the migration ends.

mod arrival;
mod cancel;
mod destination;
mod job;
mod outcome;
mod prepare;
mod source;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::Signal;

use crate::api::ApiError;
use crate::events::Caller;
use crate::ledger::{Holder, Reservation};
use crate::model::VmDefinition;
use crate::server::Agent;
use crate::supervisor::{self, Vmm};

pub use destination::{IncomingPhase, IncomingSlot, IncomingView, PeerOffer, Prepared};
pub(crate) use job::Handoff;
pub use job::{JobPhase, JobProgress, JobSlot, MigrationJob, MigrationTarget, StartMigration};

const STOP_GRACE: Duration = Duration::from_secs(10);
/// The line `ferry receive` prints once the VM runs there.
pub(crate) const RECEIVED: &str = "ferry: VM received from ";

/// What the report's `transport` says of a plaintext data plane.
pub const PLAINTEXT: &str = "plaintext data plane (insecure_plaintext_data_plane = true on both agents; the control plane was mutual TLS 1.3)";

/// What a job's `transport` says of a data plane over mutual TLS to `peer`.
pub fn mutual_tls(peer: &str) -> String {
    format!("mutual TLS (TLS 1.3, peer {peer}), every connection bound to this migration by a one-time token")
}

/// The file name of a prepared migration's session token, next to the
/// receiver's console log.
pub(crate) const TOKEN_FILE: &str = "session.token";

fn reservation(def: &VmDefinition, holder: Holder) -> Reservation {
    Reservation {
        mem_bytes: def.mem_bytes,
        vcpus: def.vcpus,
        holder,
    }
}

fn host_of(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Peer { role, name, .. } if role == "host" => Some(name),
        _ => None,
    }
}

/// Bytes appended to `path` past `*offset`, as text.
pub(crate) fn read_new(path: &Path, offset: &mut u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(4 << 20).read_to_end(&mut buf);
    // Only whole lines: a line being written is read next time.
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    *offset += end as u64;
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Agent {
    /// This host's identity directory, as the VMMs it starts must read it.
    fn tls_dir(&self) -> Result<PathBuf, ApiError> {
        let dir = self.config.tls_dir.as_ref().ok_or_else(|| {
            ApiError::Incompatible(
                "this host has no tls_dir in its config: its data plane cannot be mutual TLS"
                    .into(),
            )
        })?;
        Ok(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()))
    }
}

/// SIGKILL, and the exit it caused.
async fn kill(vmm: Vmm) -> supervisor::Exit {
    let _ = vmm.handle().signal(Signal::KILL);
    vmm.wait().await
}

/// SIGTERM, then SIGKILL after a grace.
pub(crate) async fn stop(vmm: Vmm) {
    let handle = vmm.handle();
    let _ = handle.signal(Signal::TERM);
    let mut waiting = tokio::spawn(vmm.wait());
    if tokio::time::timeout(STOP_GRACE, &mut waiting)
        .await
        .is_err()
    {
        let _ = handle.signal(Signal::KILL);
        let _ = waiting.await;
    }
}
