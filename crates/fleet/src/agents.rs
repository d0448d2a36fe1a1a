//! How the fleet reaches each host's agent, and what it needs to boot a
//! VM afresh: records a registering agent writes beside its host record.
//!
//! - `agents/HOST`: the agent's API socket (the fleet's way in on one
//!   machine) and its peer listener's address (where other agents send
//!   the VMs they migrate to it; an operator's certificate reaches its
//!   API there too).
//! - `definitions/VM`: the VM's definition as its agent keeps it, opaque
//!   to the fleet, so that a terminated VM can be booted on another host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::fleet_store::{Batch, Versioned};
use crate::store::{Backend, Expect, StoreError};

pub const AGENTS: &str = "agents/";
pub const DEFINITIONS: &str = "definitions/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEndpoint {
    pub host: String,
    /// The agent's Unix socket (an operator's full API).
    pub socket: PathBuf,
    /// host:port of its peer (mutual TLS) listener, if it serves one.
    pub peer_address: Option<String>,
    /// The agent's version (Cargo's, as it reports it).
    pub agent_version: String,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what: key.to_string(),
        why: e.to_string(),
    })
}

/// The endpoint `host` registered, if any.
pub fn endpoint<B: Backend>(b: &B, host: &str) -> Result<Option<AgentEndpoint>, StoreError> {
    let key = format!("{AGENTS}{host}");
    b.get(&key)?.map(|e| decode(&key, &e.value)).transpose()
}

/// Adds the write of `ep` to `batch`.
pub fn put_endpoint(batch: &mut Batch, ep: &AgentEndpoint) -> Result<(), StoreError> {
    batch.put(format!("{AGENTS}{}", ep.host), ep, Expect::Any)
}

/// A VM's definition as its agent wrote it.
pub fn definition<B: Backend>(
    b: &B,
    vm: &str,
) -> Result<Option<Versioned<serde_json::Value>>, StoreError> {
    let key = format!("{DEFINITIONS}{vm}");
    b.get(&key)?
        .map(|e| {
            decode(&key, &e.value).map(|value| Versioned {
                value,
                revision: e.mod_revision,
            })
        })
        .transpose()
}

/// Adds the write of `vm`'s definition to `batch`.
pub fn put_definition(
    batch: &mut Batch,
    vm: &str,
    def: &serde_json::Value,
) -> Result<(), StoreError> {
    batch.put(format!("{DEFINITIONS}{vm}"), def, Expect::Any)
}
