//! The store as one request of the page reads it: every record and the
//! live leases, read in three calls and then served from memory. The page
//! reads hosts, registrations, VMs, plans, their entries, the migrator's
//! records and agents' endpoints; asked of the shared store file one by
//! one, each is an open of the file that the scheduler and the agents
//! wait on (it took ~0.8 s a page on a two-core machine). One read of
//! everything is also one view of the fleet, not several moments.

use std::collections::BTreeMap;

use crate::store::{Backend, Change, Entry, LeaseId, StoreError, Txn};

#[derive(Debug, Clone, Default)]
pub struct Frozen {
    /// The store's revision just before the records were read (they are
    /// at least this new).
    pub revision: u64,
    entries: BTreeMap<String, Entry>,
    leases: Vec<LeaseId>,
}

fn refused() -> StoreError {
    StoreError::Backend("a frozen read of the store cannot be written".into())
}

impl Frozen {
    /// Reads every record of `b` and its live leases.
    pub fn read<B: Backend + ?Sized>(b: &B) -> Result<Self, StoreError> {
        let revision = b.revision()?;
        let entries = b
            .list("")?
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect();
        let leases = b.live_leases()?;
        Ok(Self {
            revision,
            entries,
            leases,
        })
    }
}

impl Backend for Frozen {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect())
    }
    fn commit(&self, _txn: &Txn) -> Result<u64, StoreError> {
        Err(refused())
    }
    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.revision)
    }
    fn grant_lease(&self, _ttl_ms: u64) -> Result<LeaseId, StoreError> {
        Err(refused())
    }
    fn keep_alive(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(refused())
    }
    fn revoke_lease(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(refused())
    }
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        Ok(self.leases.clone())
    }
    fn changes_since(&self, _revision: u64) -> Result<Vec<Change>, StoreError> {
        Err(StoreError::Backend(
            "a frozen read of the store keeps no history".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBackend;
    use crate::store::Op;

    #[test]
    fn a_frozen_read_lists_by_prefix_and_does_not_follow_later_writes() {
        let m = MemoryBackend::new();
        let put = |k: &str| Op::Put {
            key: k.into(),
            value: b"x".to_vec(),
        };
        m.commit(&Txn {
            ops: vec![put("hosts/a"), put("hosts/b"), put("hostsx"), put("vms/1")],
            ..Txn::default()
        })
        .unwrap();
        let lease = m.grant_lease(1000).unwrap();
        let f = Frozen::read(&m).unwrap();
        m.commit(&Txn {
            ops: vec![put("hosts/c")],
            ..Txn::default()
        })
        .unwrap();
        let keys: Vec<String> = f
            .list("hosts/")
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["hosts/a", "hosts/b"]);
        assert_eq!(f.list("").unwrap().len(), 4);
        assert!(f.get("vms/1").unwrap().is_some());
        assert_eq!(f.live_leases().unwrap(), vec![lease]);
        assert!(f.commit(&Txn::default()).is_err());
    }
}
