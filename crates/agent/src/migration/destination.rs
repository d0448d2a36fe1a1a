//! The destination's side as a source sees it: the offer, the answer,
//! the incoming migration's view, and who may look at it or abort it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::host_of;
use crate::api::ApiError;
use crate::events::Caller;
use crate::ledger::Holder;
use crate::model::{MigrationPolicy, VmDefinition};
use crate::server::{lock, Agent};

/// `POST /v1/peer/migrations`: what a source offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerOffer {
    /// The source's job id.
    pub job: String,
    /// The VM's id, kept on the destination.
    pub vm: String,
    pub definition: VmDefinition,
    pub policy: MigrationPolicy,
    /// The source's agent allows a plaintext data plane.
    pub plaintext_data_plane: bool,
}

/// The destination's answer to an offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prepared {
    /// The destination's id of this incoming migration.
    pub id: String,
    /// Where the source's VMM connects.
    pub address: String,
    /// One-time token bound to this migration (32 random bytes, hex): the
    /// source's VMM opens every connection with it.
    pub token: String,
    pub transport: String,
    /// The data plane is in the clear (both agents allow it); otherwise
    /// mutual TLS 1.3 with the two hosts' certificates.
    #[serde(default)]
    pub plaintext: bool,
    /// The reservation is released if the VM has not arrived by then.
    pub expires_in_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncomingPhase {
    /// Reserved; the receiver listens.
    Ready,
    /// The VM runs here and has a record.
    Committed,
    /// The source gave up (failure or cancel); released.
    Aborted,
    /// Not used in time; released.
    Expired,
    /// The receiver ended without the VM; released.
    Failed,
}

/// `GET /v1/peer/migrations/{id}`: an incoming migration of this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingView {
    pub id: String,
    pub vm: String,
    pub job: String,
    /// The host whose certificate prepared it (none: a local operator).
    pub source: Option<String>,
    pub phase: IncomingPhase,
    pub address: String,
    pub mem_bytes: u64,
    pub reason: Option<String>,
    pub created_at: String,
}

pub struct IncomingSlot {
    pub(crate) view: Mutex<IncomingView>,
    /// Only this host (or an operator) may see or abort it.
    pub(super) source: Option<String>,
    pub(super) abort: AtomicBool,
    pub(super) wake: tokio::sync::Notify,
}

impl IncomingSlot {
    /// A slot showing `view` (prepared now, or read back after a restart).
    pub(crate) fn new(view: IncomingView) -> Arc<Self> {
        Arc::new(Self {
            source: view.source.clone(),
            view: Mutex::new(view),
            abort: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }
}

/// The incoming migration's source, or an operator, may touch it.
fn may_touch(inc: &IncomingSlot, caller: &Caller) -> bool {
    match host_of(caller) {
        Some(host) => inc
            .source
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case(host)),
        None => true,
    }
}

impl Agent {
    pub fn incoming(&self, caller: &Caller, id: &str) -> Result<IncomingView, ApiError> {
        let inc = lock(&self.incoming)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        if !may_touch(&inc, caller) {
            return Err(ApiError::Forbidden(format!(
                "incoming migration {id} was prepared by another host"
            )));
        }
        let v = lock(&inc.view).clone();
        Ok(v)
    }

    /// `DELETE /v1/peer/migrations/{id}`: the source gave up.
    pub fn abort_incoming(&self, caller: &Caller, id: &str) -> Result<IncomingView, ApiError> {
        let inc = lock(&self.incoming)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NoMigration(id.to_owned()))?;
        if !may_touch(&inc, caller) {
            return Err(ApiError::Forbidden(format!(
                "incoming migration {id} was prepared by another host"
            )));
        }
        let v = lock(&inc.view).clone();
        if v.phase == IncomingPhase::Committed {
            return Err(ApiError::Conflict(format!(
                "incoming migration {id} has committed: VM {} runs here",
                v.vm
            )));
        }
        inc.abort.store(true, Ordering::SeqCst);
        inc.wake.notify_one();
        Ok(v)
    }

    /// The incoming migration, not yet ended, that brings `vm` here.
    pub(crate) fn incoming_vm(&self, vm: &str) -> Option<String> {
        lock(&self.incoming).values().find_map(|i| {
            let v = lock(&i.view);
            (v.vm == vm && v.phase == IncomingPhase::Ready).then(|| v.id.clone())
        })
    }

    /// Memory reserved now by incoming migrations.
    pub fn incoming_reserved(&self) -> u64 {
        lock(&self.ledger).held_by(Holder::Incoming)
    }
}
