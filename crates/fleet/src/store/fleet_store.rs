//! The fleet's records on a backend: `hosts/NAME`, `vms/ID`,
//! `tenants/NAME`, `plans/ID` and `policies`, each a JSON value, each read
//! with its revision so that the next write can be checked against it.
//!
//! A plan is stored split: its header at `plans/ID` (the plan with no
//! entries) and each entry at `plan-entries/ID/NNNNNN`, so that a step of
//! a drain of thousands of VMs writes the few entries it changed, not one
//! value of megabytes (etcd refuses values over 1.5 MiB by default), and
//! each entry is compare-and-swapped on its own revision. A plan stored
//! whole (by an earlier version) still loads; it is split when next written.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Backend, Expect, LeaseId, Op, StoreError, Txn};
use crate::model::{Host, Tenant, Vm};
use crate::plan::{Plan, PlanEntry};
use crate::policy::Policies;

pub const HOSTS: &str = "hosts/";
pub const VMS: &str = "vms/";
pub const TENANTS: &str = "tenants/";
pub const PLANS: &str = "plans/";
pub const PLAN_ENTRIES: &str = "plan-entries/";
pub const POLICIES: &str = "policies";

/// A record and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// A plan as loaded, with the revisions of its header and of each entry
/// (empty for a plan stored whole).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlan {
    pub plan: Plan,
    pub revision: u64,
    pub entry_revisions: Vec<u64>,
}

pub fn plan_key(id: &str) -> String {
    format!("{PLANS}{id}")
}

pub fn entry_key(plan: &str, index: usize) -> String {
    format!("{PLAN_ENTRIES}{plan}/{index:06}")
}

/// A plan's header: the plan without its entries.
pub fn encode_plan_header(p: &Plan) -> Result<Vec<u8>, StoreError> {
    #[derive(Serialize)]
    struct Header<'a> {
        id: &'a str,
        kind: &'a crate::plan::PlanKind,
        priority: &'a crate::policy::Priority,
        state: &'a crate::plan::PlanState,
        created_at: &'a crate::time::Timestamp,
        started_at: &'a Option<crate::time::Timestamp>,
        finished_at: &'a Option<crate::time::Timestamp>,
        predicted_duration_ms: &'a Option<u64>,
        entries: [(); 0],
    }
    encode(&Header {
        id: &p.id,
        kind: &p.kind,
        priority: &p.priority,
        state: &p.state,
        created_at: &p.created_at,
        started_at: &p.started_at,
        finished_at: &p.finished_at,
        predicted_duration_ms: &p.predicted_duration_ms,
        entries: [],
    })
}

pub struct FleetStore<B: Backend> {
    backend: B,
}

/// Writes to commit together.
#[derive(Debug, Default)]
pub struct Batch {
    txn: Txn,
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
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

    /// An encoded value.
    pub fn put_raw(&mut self, key: String, value: Vec<u8>, expect: Expect) {
        self.txn.checks.push((key.clone(), expect));
        self.txn.ops.push(Op::Put { key, value });
    }

    /// A new plan, header and every entry (none of them may exist).
    pub fn new_plan(&mut self, p: &Plan) -> Result<(), StoreError> {
        self.put_raw(plan_key(&p.id), encode_plan_header(p)?, Expect::Absent);
        for (i, e) in p.entries.iter().enumerate() {
            self.put(entry_key(&p.id, i), e, Expect::Absent)?;
        }
        Ok(())
    }

    /// Deletes `key`, refused unless it is as expected.
    pub fn delete(&mut self, key: String, expect: Expect) {
        self.txn.checks.push((key.clone(), expect));
        self.txn.ops.push(Op::Delete { key });
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
        Ok(self
            .plan_records()?
            .into_iter()
            .map(|p| Versioned {
                value: p.plan,
                revision: p.revision,
            })
            .collect())
    }

    /// Every plan, its entries gathered from their own keys.
    pub fn plan_records(&self) -> Result<Vec<StoredPlan>, StoreError> {
        let headers: Vec<Versioned<Plan>> = self.list(PLANS)?;
        let mut entries: std::collections::HashMap<String, Vec<(usize, Versioned<PlanEntry>)>> =
            std::collections::HashMap::new();
        for e in self.backend.list(PLAN_ENTRIES)? {
            let value: PlanEntry =
                serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode {
                    what: e.key.clone(),
                    why: err.to_string(),
                })?;
            let entry = Versioned {
                value,
                revision: e.mod_revision,
            };
            let key = e.key;
            let rest = &key[PLAN_ENTRIES.len()..];
            let parsed = rest
                .rsplit_once('/')
                .and_then(|(id, n)| Some((id.to_string(), n.parse::<usize>().ok()?)));
            let Some((id, n)) = parsed else {
                return Err(StoreError::Decode {
                    what: key,
                    why: "not a plan entry key (plan-entries/PLAN/NNNNNN)".into(),
                });
            };
            entries.entry(id).or_default().push((n, entry));
        }
        headers
            .into_iter()
            .map(|h| {
                let mut plan = h.value;
                let mut entry_revisions = Vec::new();
                if let Some(mut es) = entries.remove(&plan.id) {
                    es.sort_by_key(|(n, _)| *n);
                    if es.iter().enumerate().any(|(i, (n, _))| i != *n) {
                        return Err(StoreError::Decode {
                            what: plan_key(&plan.id),
                            why: format!(
                                "its {} entries are not numbered 0 to {}",
                                es.len(),
                                es.len() - 1
                            ),
                        });
                    }
                    plan.entries = es
                        .into_iter()
                        .map(|(_, v)| {
                            entry_revisions.push(v.revision);
                            v.value
                        })
                        .collect();
                }
                Ok(StoredPlan {
                    plan,
                    revision: h.revision,
                    entry_revisions,
                })
            })
            .collect()
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
