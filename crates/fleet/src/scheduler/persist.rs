//! Writing what changed: every plan, VM and host the scheduler touched
//! since its last write goes in one transaction, each checked against the
//! revision the scheduler last saw, under its lease. A conflict means
//! another writer changed the fleet: the scheduler stops rather than
//! overwrite it.

use super::{Scheduler, SchedulerError};
use crate::migrator::Migrator;
use crate::store::fleet_store::{Batch, HOSTS, PLANS, VMS};
use crate::store::{Backend, Expect};

pub fn plan_key(id: &str) -> String {
    format!("{PLANS}{id}")
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
        for &i in &self.dirty_plans {
            let p = &self.plans[i];
            batch.plan(p, self.expect(&plan_key(&p.id)))?;
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
        self.dirty_plans.clear();
        self.dirty_vms.clear();
        self.dirty_hosts.clear();
        Ok(())
    }
}
