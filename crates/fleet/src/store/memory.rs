//! A backend in memory: tests, the simulator and the dry run, where
//! nothing must outlive the process.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;

use super::{Backend, Change, Entry, LeaseId, Op, StoreError, Txn, CHANGE_HISTORY};

#[derive(Default)]
struct Inner {
    kv: BTreeMap<String, (Vec<u8>, u64)>,
    revision: u64,
    leases: HashSet<u64>,
    next_lease: u64,
    log: VecDeque<Change>,
}

#[derive(Default)]
pub struct MemoryBackend {
    inner: Mutex<Inner>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave a half-applied transaction: each
        // one is applied after all its checks passed, without a panic path.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.lock().kv.get(key).map(|(v, r)| Entry {
            key: key.to_string(),
            value: v.clone(),
            mod_revision: *r,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let g = self.lock();
        Ok(g.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, r))| Entry {
                key: k.clone(),
                value: v.clone(),
                mod_revision: *r,
            })
            .collect())
    }

    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        let mut g = self.lock();
        if let Some(l) = txn.lease {
            if !g.leases.contains(&l.0) {
                return Err(StoreError::Fenced(l));
            }
        }
        for (key, expect) in &txn.checks {
            expect.check(key, g.kv.get(key).map(|(_, r)| *r))?;
        }
        g.revision += 1;
        let rev = g.revision;
        for op in &txn.ops {
            let (key, put) = match op {
                Op::Put { key, value } => {
                    g.kv.insert(key.clone(), (value.clone(), rev));
                    (key.clone(), true)
                }
                Op::Delete { key } => {
                    g.kv.remove(key);
                    (key.clone(), false)
                }
            };
            g.log.push_back(Change {
                revision: rev,
                key,
                put,
            });
        }
        while g.log.len() as u64 > CHANGE_HISTORY {
            g.log.pop_front();
        }
        Ok(rev)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.lock().revision)
    }

    fn grant_lease(&self, _ttl_ms: u64) -> Result<LeaseId, StoreError> {
        let mut g = self.lock();
        g.next_lease += 1;
        let id = g.next_lease;
        g.leases.insert(id);
        Ok(LeaseId(id))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.lock().leases.contains(&lease.0) {
            Ok(())
        } else {
            Err(StoreError::Fenced(lease))
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lock().leases.remove(&lease.0);
        Ok(())
    }

    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        let mut v: Vec<LeaseId> = self.lock().leases.iter().map(|&l| LeaseId(l)).collect();
        v.sort_unstable_by_key(|l| l.0);
        Ok(v)
    }

    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        let g = self.lock();
        if let Some(first) = g.log.front() {
            if revision + 1 < first.revision {
                return Err(StoreError::Compacted {
                    asked: revision,
                    oldest: first.revision,
                });
            }
        }
        Ok(g.log
            .iter()
            .filter(|c| c.revision > revision)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_the_store_contract() {
        super::super::contract::check(&super::MemoryBackend::new());
    }
}
