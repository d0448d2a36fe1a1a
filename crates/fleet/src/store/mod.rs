//! The fleet's state (hosts, VMs, tenants, policies, plans) behind one
//! interface. A backend is a small key-value store with the shape of
//! etcd's v3 API, so that an etcd backend fits behind it unchanged:
//! - every write bumps one store-wide revision and stamps the keys it wrote
//!   with it (etcd's `mod_revision`);
//! - writes are transactions guarded by per-key expectations (absent, or
//!   at a revision): compare-and-swap, etcd's `Txn` with `Compare`s;
//! - a transaction may carry a lease, and is refused once that lease is
//!   revoked or lapsed: a scheduler that lost its leadership cannot write
//!   (fencing);
//! - `changes_since` reads what changed after a revision (a watch, polled),
//!   and says so when that history is compacted away.
//!
//! Three backends here: [`memory::MemoryBackend`] (tests, the simulator,
//! the dry run), [`embedded::RedbBackend`], one file, the default for a
//! fleet run from one machine, and [`etcd::EtcdBackend`], for a fleet
//! across machines. [`shared_file::SharedFileBackend`] is the embedded
//! file shared by the processes of one machine (agents registering, the
//! scheduler), with leases that lapse.

pub mod embedded;
pub mod etcd;
pub mod fleet_store;
pub mod memory;
pub mod shared_file;

use serde::{Deserialize, Serialize};

pub use fleet_store::FleetStore;

/// A key's value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

/// What a transaction expects of a key before it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: write whatever is there.
    Any,
    /// The key does not exist.
    Absent,
    /// The key was last written at this revision.
    At(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// A lease held by a writer (etcd's lease ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

/// All checks hold and all ops apply, or nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<(String, Expect)>,
    pub ops: Vec<Op>,
    /// Refused unless this lease is alive.
    pub lease: Option<LeaseId>,
}

/// A change after some revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub revision: u64,
    pub key: String,
    /// False for a delete.
    pub put: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}: {why} (is another scheduler using it?)")]
    Open { path: String, why: String },
    #[error("write refused: {key} expected {expected}, found {found} (another writer changed it; reload and decide again)")]
    Conflict {
        key: String,
        expected: String,
        found: String,
    },
    #[error("write refused: lease {0:?} is not alive (this scheduler is no longer the leader)")]
    Fenced(LeaseId),
    #[error(
        "history before revision {oldest} is compacted; asked from {asked}: reload everything"
    )]
    Compacted { asked: u64, oldest: u64 },
    #[error("store: {0}")]
    Backend(String),
    #[error("a stored {what} does not decode: {why}")]
    Decode { what: String, why: String },
}

impl Expect {
    fn describe(self) -> String {
        match self {
            Self::Any => "anything".into(),
            Self::Absent => "no value".into(),
            Self::At(r) => format!("revision {r}"),
        }
    }

    /// Checks a key's current revision (None: absent).
    pub fn check(self, key: &str, current: Option<u64>) -> Result<(), StoreError> {
        let ok = match self {
            Self::Any => true,
            Self::Absent => current.is_none(),
            Self::At(r) => current == Some(r),
        };
        if ok {
            return Ok(());
        }
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: self.describe(),
            found: current.map_or("no value".into(), |r| format!("revision {r}")),
        })
    }
}

/// The store interface every backend implements.
pub trait Backend {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// Applies the transaction; returns the new store revision.
    fn commit(&self, txn: &Txn) -> Result<u64, StoreError>;
    /// The store's current revision.
    fn revision(&self) -> Result<u64, StoreError>;
    /// A lease that lives `ttl_ms` unless kept alive (the embedded store
    /// is one process's: its leases live until revoked).
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError>;
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Every lease alive now: a host's registration, a leader's claim.
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError>;
    /// What changed after `revision`, oldest first.
    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError>;
}

/// How many changes a backend keeps for `changes_since`.
pub const CHANGE_HISTORY: u64 = 100_000;

/// The contract every backend keeps, as one check (public for the etcd
/// backend's tests, which run against a real etcd).
#[doc(hidden)]
pub mod contract;

/// A backend shared by several owners (a leader's scheduler, its
/// campaign and the host watch use one etcd connection).
impl<T: Backend + ?Sized> Backend for std::sync::Arc<T> {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        (**self).get(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        (**self).list(prefix)
    }
    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        (**self).commit(txn)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        (**self).revision()
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        (**self).grant_lease(ttl_ms)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).revoke_lease(lease)
    }
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        (**self).live_leases()
    }
    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        (**self).changes_since(revision)
    }
}

/// A borrowed backend (a registration's writes on the caller's store).
impl<T: Backend + ?Sized> Backend for &T {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        (**self).get(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        (**self).list(prefix)
    }
    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        (**self).commit(txn)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        (**self).revision()
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        (**self).grant_lease(ttl_ms)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).revoke_lease(lease)
    }
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        (**self).live_leases()
    }
    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        (**self).changes_since(revision)
    }
}
