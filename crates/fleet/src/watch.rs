//! How a serving leader learns of plans written while it runs: an
//! operator's `ferry host drain` (a new plan, running) or `--cancel` (a
//! plan cancelled) is written by another process, so the leader reads the
//! store's changes after the revision it loaded at (`changes_since`: on
//! etcd a watch replayed from that revision, on the shared file its change
//! log) once per tick, and reloads when a plan key changed that it did not
//! write itself. One read per tick: bounded, no busy loop.

use crate::store::fleet_store::{PLANS, PLAN_ENTRIES};
use crate::store::{Backend, StoreError};

#[derive(Debug, Clone)]
pub struct PlanWatch {
    /// Every change up to this revision has been looked at.
    seen: u64,
}

impl PlanWatch {
    /// Watches from the store's revision now: take it before loading the
    /// fleet, so that a write between the two is seen, not lost.
    pub fn starting_now<B: Backend>(backend: &B) -> Result<Self, StoreError> {
        Ok(Self {
            seen: backend.revision()?,
        })
    }

    /// The first plan key another writer changed since the last call, if
    /// any. `own(key, revision)` says whether this leader wrote it.
    pub fn foreign_plan_change<B: Backend>(
        &mut self,
        backend: &B,
        own: impl Fn(&str, u64) -> bool,
    ) -> Result<Option<String>, StoreError> {
        let changes = backend.changes_since(self.seen)?;
        let mut found = None;
        for c in changes {
            self.seen = self.seen.max(c.revision);
            let is_plan = c.key.starts_with(PLANS) || c.key.starts_with(PLAN_ENTRIES);
            if found.is_none() && is_plan && !own(&c.key, c.revision) {
                found = Some(c.key);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBackend;
    use crate::store::{Expect, Op, Txn};

    fn put(b: &MemoryBackend, key: &str) -> u64 {
        b.commit(&Txn {
            checks: vec![(key.to_string(), Expect::Any)],
            ops: vec![Op::Put {
                key: key.to_string(),
                value: b"{}".to_vec(),
            }],
            lease: None,
        })
        .unwrap()
    }

    #[test]
    fn a_plan_written_by_another_is_seen_once_and_own_writes_and_hosts_are_not() {
        let b = MemoryBackend::new();
        put(&b, "plans/before");
        let mut w = PlanWatch::starting_now(&b).unwrap();
        assert_eq!(w.foreign_plan_change(&b, |_, _| false).unwrap(), None);
        let mine = put(&b, "plans/mine");
        put(&b, "hosts/h1");
        assert_eq!(
            w.foreign_plan_change(&b, |k, r| k == "plans/mine" && r == mine)
                .unwrap(),
            None
        );
        put(&b, "plan-entries/p9/000000");
        assert_eq!(
            w.foreign_plan_change(&b, |_, _| false).unwrap().as_deref(),
            Some("plan-entries/p9/000000")
        );
        assert_eq!(w.foreign_plan_change(&b, |_, _| false).unwrap(), None);
    }
}
