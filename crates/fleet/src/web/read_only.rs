//! A backend that only reads: the web page's way into the store, so that
//! no request can write, whatever its handler does. (A backend's own
//! housekeeping on a read, such as the shared file revoking a lease past
//! its deadline, is the store's expiry, not a write of the page's.)

use crate::store::{Backend, Change, Entry, LeaseId, StoreError, Txn};

#[derive(Debug, Clone)]
pub struct ReadOnly<B>(pub B);

fn refused(what: &str) -> StoreError {
    StoreError::Backend(format!(
        "{what} refused: the web page reads the store and never writes it"
    ))
}

impl<B: Backend> Backend for ReadOnly<B> {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.0.get(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.0.list(prefix)
    }
    fn commit(&self, _txn: &Txn) -> Result<u64, StoreError> {
        Err(refused("a write"))
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.0.revision()
    }
    fn grant_lease(&self, _ttl_ms: u64) -> Result<LeaseId, StoreError> {
        Err(refused("a lease"))
    }
    fn keep_alive(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(refused("a keep-alive"))
    }
    fn revoke_lease(&self, _lease: LeaseId) -> Result<(), StoreError> {
        Err(refused("a revoke"))
    }
    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        self.0.live_leases()
    }
    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        self.0.changes_since(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBackend;
    use crate::store::Op;

    #[test]
    fn reads_pass_and_every_write_is_refused() {
        let m = MemoryBackend::default();
        m.commit(&Txn {
            ops: vec![Op::Put {
                key: "k".into(),
                value: b"v".to_vec(),
            }],
            ..Txn::default()
        })
        .unwrap();
        let r = ReadOnly(&m);
        assert_eq!(r.get("k").unwrap().unwrap().value, b"v");
        let before = m.revision().unwrap();
        let put = Txn {
            ops: vec![Op::Delete { key: "k".into() }],
            ..Txn::default()
        };
        assert!(r.commit(&put).is_err());
        assert!(r.grant_lease(1000).is_err());
        assert_eq!(m.revision().unwrap(), before);
        assert!(m.get("k").unwrap().is_some());
    }
}
