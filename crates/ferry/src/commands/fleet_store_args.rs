//! Which fleet store a command works on, chosen the way `ferry fleet
//! serve` chooses it: `--store-file F` (the embedded file of a
//! one-machine fleet, shared with its ferryd) or else etcd (`--etcd`,
//! `--prefix`). [`AnyStore`] is either backend behind one type, so the
//! commands that only read and write records are written once.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ferry_fleet::store::etcd::{EtcdBackend, DEFAULT_PREFIX};
use ferry_fleet::store::shared_file::SharedFileBackend;
use ferry_fleet::store::{Backend, Change, Entry, LeaseId, StoreError, Txn};

/// The etcd half of [`StoreArgs`], alone where a command runs on etcd only
/// (`ferry fleet host register|list`).
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// etcd's client URL.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub etcd: String,
    /// The key prefix the fleet lives under.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
}

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The embedded store: the file of a one-machine fleet, shared with
    /// its ferryd (their `[fleet] store`), instead of etcd.
    #[arg(long, conflicts_with = "etcd")]
    pub store_file: Option<PathBuf>,
}

#[derive(Clone)]
pub enum AnyStore {
    File(SharedFileBackend),
    Etcd(Arc<EtcdBackend>),
}

impl EtcdArgs {
    pub fn connect(&self) -> anyhow::Result<Arc<EtcdBackend>> {
        Ok(Arc::new(
            EtcdBackend::connect(&self.etcd, &self.prefix)
                .with_context(|| format!("etcd at {}", self.etcd))?,
        ))
    }
}

impl StoreArgs {
    pub fn open(&self) -> anyhow::Result<AnyStore> {
        Ok(match &self.store_file {
            Some(path) => {
                anyhow::ensure!(
                    path.exists(),
                    "the store file {} does not exist (it is the file the hosts' ferryd register in)",
                    path.display()
                );
                AnyStore::File(
                    SharedFileBackend::open(path)
                        .with_context(|| format!("the store file {}", path.display()))?,
                )
            }
            None => AnyStore::Etcd(self.etcd.connect()?),
        })
    }
}

impl AnyStore {
    fn inner(&self) -> &dyn Backend {
        match self {
            Self::File(b) => b,
            Self::Etcd(b) => b.as_ref(),
        }
    }
}

impl Backend for AnyStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner().get(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.inner().list(prefix)
    }
    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        self.inner().commit(txn)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.inner().revision()
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        self.inner().grant_lease(ttl_ms)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner().keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner().revoke_lease(lease)
    }
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        self.inner().live_leases()
    }
    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        self.inner().changes_since(revision)
    }
}
