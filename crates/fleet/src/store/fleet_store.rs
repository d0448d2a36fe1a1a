//! The fleet's records on a backend: `hosts/NAME`, `vms/ID`,
//! `tenants/NAME`, `plans/ID` and `policies`, each a JSON value, each read
//! with its revision so that the next write can be checked against it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Backend, Expect, LeaseId, Op, StoreError, Txn};
use crate::model::{Host, Tenant, Vm};
use crate::plan::Plan;
use crate::policy::Policies;

pub const HOSTS: &str = "hosts/";
pub const VMS: &str = "vms/";
pub const TENANTS: &str = "tenants/";
pub const PLANS: &str = "plans/";
pub const POLICIES: &str = "policies";

/// A record and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

pub struct FleetStore<B: Backend> {
    backend: B,
}

/// Writes to commit together.
#[derive(Debug, Default)]
pub struct Batch {
    txn: Txn,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(format!("cannot encode a record: {e}")))
}

impl Batch {
    pub fn put<T: Serialize>(
        &mut self,
        key: String,
        value: &T,
        expect: Expect,
    ) -> Result<(), StoreError> {
        self.txn.checks.push((key.clone(), expect));
        self.txn.ops.push(Op::Put {
            key,
            value: encode(value)?,
        });
        Ok(())
    }

    pub fn host(&mut self, h: &Host, expect: Expect) -> Result<(), StoreError> {
        self.put(format!("{HOSTS}{}", h.name), h, expect)
    }

    pub fn vm(&mut self, v: &Vm, expect: Expect) -> Result<(), StoreError> {
        self.put(format!("{VMS}{}", v.id), v, expect)
    }

    pub fn tenant(&mut self, t: &Tenant, expect: Expect) -> Result<(), StoreError> {
        self.put(format!("{TENANTS}{}", t.name), t, expect)
    }

    pub fn plan(&mut self, p: &Plan, expect: Expect) -> Result<(), StoreError> {
        self.put(format!("{PLANS}{}", p.id), p, expect)
    }

    /// A check with no write: the transaction is refused unless `key` is
    /// as expected (the leader key, for a leader's writes).
    pub fn require(&mut self, key: String, expect: Expect) {
        self.txn.checks.push((key, expect));
    }

    pub fn is_empty(&self) -> bool {
        self.txn.ops.is_empty()
    }

    /// The keys this batch writes, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.txn.ops.iter().map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.as_str(),
        })
    }
}

impl<B: Backend> FleetStore<B> {
    pub fn new(backend: B) -> Self {
        Self { backend }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn into_backend(self) -> B {
        self.backend
    }

    fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<Versioned<T>>, StoreError> {
        self.backend
            .list(prefix)?
            .into_iter()
            .map(|e| {
                serde_json::from_slice(&e.value)
                    .map(|value| Versioned {
                        value,
                        revision: e.mod_revision,
                    })
                    .map_err(|err| StoreError::Decode {
                        what: e.key.clone(),
                        why: err.to_string(),
                    })
            })
            .collect()
    }

    pub fn hosts(&self) -> Result<Vec<Versioned<Host>>, StoreError> {
        self.list(HOSTS)
    }

    pub fn vms(&self) -> Result<Vec<Versioned<Vm>>, StoreError> {
        self.list(VMS)
    }

    pub fn tenants(&self) -> Result<Vec<Versioned<Tenant>>, StoreError> {
        self.list(TENANTS)
    }

    pub fn plans(&self) -> Result<Vec<Versioned<Plan>>, StoreError> {
        self.list(PLANS)
    }

    pub fn policies(&self) -> Result<Option<Versioned<Policies>>, StoreError> {
        Ok(self.list::<Policies>(POLICIES)?.into_iter().next())
    }

    /// Commits the batch under `lease`; returns the revision every key in
    /// it now has.
    pub fn commit(&self, mut batch: Batch, lease: Option<LeaseId>) -> Result<u64, StoreError> {
        batch.txn.lease = lease;
        self.backend.commit(&batch.txn)
    }

    /// Writes a whole fleet that does not exist yet (a fresh store).
    pub fn seed(
        &self,
        hosts: &[Host],
        vms: &[Vm],
        tenants: &[Tenant],
        policies: &Policies,
    ) -> Result<u64, StoreError> {
        let mut b = Batch::default();
        for h in hosts {
            b.host(h, Expect::Absent)?;
        }
        for v in vms {
            b.vm(v, Expect::Absent)?;
        }
        for t in tenants {
            b.tenant(t, Expect::Absent)?;
        }
        b.put(POLICIES.to_string(), policies, Expect::Any)?;
        self.commit(b, None)
    }
}
