//! Writing what changed: every plan, VM and host the scheduler touched
//! since its last write goes in one transaction, each checked against the
//! revision the scheduler last saw, under its lease. A conflict means
//! another writer changed the fleet: the scheduler stops rather than
//! overwrite it.

use super::{Scheduler, SchedulerError};
use crate::migrator::Migrator;
use crate::store::fleet_store::{encode, encode_plan_header, entry_key, Batch, HOSTS, VMS};
use crate::store::{Backend, Expect};

pub use crate::store::fleet_store::plan_key;

/// What a stored value was, to skip writing what did not change.
pub(super) fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

pub fn vm_key(id: &str) -> String {
    format!("{VMS}{id}")
}

pub fn host_key(name: &str) -> String {
    format!("{HOSTS}{name}")
}

impl<B: Backend, M: Migrator> Scheduler<B, M> {
    fn expect(&self, key: &str) -> Expect {
        self.revisions
            .get(key)
            .map_or(Expect::Absent, |&r| Expect::At(r))
    }

    /// Commits every change since the last commit.
    pub(super) fn persist(&mut self) -> Result<(), SchedulerError> {
        if self.dirty_plans.is_empty() && self.dirty_vms.is_empty() && self.dirty_hosts.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        // A plan's header and entries are written only where they changed
        // since they were last written or read.
        let mut digests = Vec::new();
        for &i in &self.dirty_plans {
            let p = &self.plans[i];
            let key = plan_key(&p.id);
            let header = encode_plan_header(p)?;
            let d = digest(&header);
            if self.written.get(&key) != Some(&d) {
                batch.put_raw(key.clone(), header, self.expect(&key));
                digests.push((key, d));
            }
            for (ei, e) in p.entries.iter().enumerate() {
                let key = entry_key(&p.id, ei);
                let bytes = encode(e)?;
                let d = digest(&bytes);
                if self.written.get(&key) != Some(&d) {
                    batch.put_raw(key.clone(), bytes, self.expect(&key));
                    digests.push((key, d));
                }
            }
        }
        for &v in &self.dirty_vms {
            let vm = self.fleet.vm(v);
            batch.vm(vm, self.expect(&vm_key(&vm.id)))?;
        }
        for &h in &self.dirty_hosts {
            let host = self.fleet.host(h);
            batch.host(host, self.expect(&host_key(&host.name)))?;
        }
        let keys: Vec<String> = batch.keys().map(str::to_string).collect();
        if let Some((key, rev)) = &self.fence {
            batch.require(key.clone(), Expect::At(*rev));
        }
        let rev = self.store.commit(batch, self.lease)?;
        for k in keys {
            self.revisions.insert(k, rev);
        }
        self.written.extend(digests);
        self.dirty_plans.clear();
        self.dirty_vms.clear();
        self.dirty_hosts.clear();
        Ok(())
    }

    /// Deletes the plans `ids` (header and entries), each checked against
    /// what the scheduler last saw, from the store and from the scheduler.
    pub(super) fn forget_plans(&mut self, ids: &[String]) -> Result<(), SchedulerError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Pending writes first: they name plans by position.
        self.persist()?;
        let mut batch = Batch::default();
        let mut keys = Vec::new();
        for p in self.plans.iter().filter(|p| ids.contains(&p.id)) {
            let key = plan_key(&p.id);
            batch.delete(key.clone(), self.expect(&key));
            keys.push(key);
            for ei in 0..p.entries.len() {
                let key = entry_key(&p.id, ei);
                // A plan stored whole (before entries had keys) has none.
                if let Some(&rev) = self.revisions.get(&key) {
                    batch.delete(key.clone(), Expect::At(rev));
                    keys.push(key);
                }
            }
        }
        if let Some((key, rev)) = &self.fence {
            batch.require(key.clone(), Expect::At(*rev));
        }
        self.store.commit(batch, self.lease)?;
        for k in keys {
            self.revisions.remove(&k);
            self.written.remove(&k);
        }
        self.plans.retain(|p| !ids.contains(&p.id));
        Ok(())
    }
}
