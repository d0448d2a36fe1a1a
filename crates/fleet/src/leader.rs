//! Leader election among several `ferry fleet serve`: the leader is the
//! scheduler whose claim is in the leader key. A claim names its holder
//! and the lease it holds; it is taken over only when that lease is no
//! longer alive (its holder died or stepped down), by one compare-and-swap
//! on the key's revision, so two candidates never both win.
//!
//! Fencing: the leader's scheduler writes under its lease and checks the
//! leader key at the revision of its claim ([`Scheduler::open_as_leader`]).
//! A deposed leader (its lease lapsed, someone else claimed) has every
//! write refused by the store, in the same transaction as the write.
//!
//! [`Scheduler::open_as_leader`]: crate::scheduler::Scheduler::open_as_leader

use serde::{Deserialize, Serialize};

use crate::store::{Backend, Expect, LeaseId, Op, StoreError, Txn};

/// The key that names the leader, under the store's prefix.
pub const LEADER_KEY: &str = "leader";

/// What the leader key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub name: String,
    pub lease: LeaseId,
}

/// A won election: the lease to write under and the revision of the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub name: String,
    pub lease: LeaseId,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    Won(Leadership),
    /// Someone else leads, with a live lease.
    Held {
        by: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the leader key holds something that is not a claim ({0}); remove it with etcdctl if no scheduler runs")]
    BadClaim(String),
    #[error("a scheduler name must be 1 to 64 characters of letters, digits, '-', '_' or '.'; got {0:?}")]
    BadName(String),
}

/// One scheduler that wants to lead. It holds a lease from the start, and
/// keeps it alive while it waits, so that it wins at once when it can.
pub struct Candidate {
    name: String,
    ttl_ms: u64,
    lease: Option<LeaseId>,
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The current leader's claim, if any, with the key's revision.
pub fn current<B: Backend>(b: &B) -> Result<Option<(Claim, u64)>, LeaderError> {
    let Some(e) = b.get(LEADER_KEY)? else {
        return Ok(None);
    };
    let claim: Claim =
        serde_json::from_slice(&e.value).map_err(|err| LeaderError::BadClaim(err.to_string()))?;
    Ok(Some((claim, e.mod_revision)))
}

impl Candidate {
    /// `ttl_ms`: how long the leadership outlives its holder's last
    /// keep-alive; another candidate takes over after that.
    pub fn new(name: &str, ttl_ms: u64) -> Result<Self, LeaderError> {
        if !valid_name(name) {
            return Err(LeaderError::BadName(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            ttl_ms,
            lease: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A live lease of this candidate's (a new one if the last lapsed).
    fn lease<B: Backend>(&mut self, b: &B) -> Result<LeaseId, StoreError> {
        if let Some(l) = self.lease {
            match b.keep_alive(l) {
                Ok(()) => return Ok(l),
                Err(StoreError::Fenced(_)) => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        let l = b.grant_lease(self.ttl_ms)?;
        self.lease = Some(l);
        Ok(l)
    }

    /// One try: claims the leadership when nobody holds it or its
    /// holder's lease is gone. A leader that asks again keeps its claim.
    pub fn try_lead<B: Backend>(&mut self, b: &B) -> Result<Campaign, LeaderError> {
        let lease = self.lease(b)?;
        let expect = match current(b)? {
            None => Expect::Absent,
            Some((claim, rev)) => {
                if claim.lease == lease && claim.name == self.name {
                    return Ok(Campaign::Won(Leadership {
                        name: self.name.clone(),
                        lease,
                        revision: rev,
                    }));
                }
                if b.live_leases()?.contains(&claim.lease) {
                    return Ok(Campaign::Held { by: claim.name });
                }
                Expect::At(rev)
            }
        };
        let claim = Claim {
            name: self.name.clone(),
            lease,
        };
        let value = serde_json::to_vec(&claim)
            .map_err(|e| StoreError::Backend(format!("cannot encode a claim: {e}")))?;
        let txn = Txn {
            checks: vec![(LEADER_KEY.to_string(), expect)],
            ops: vec![Op::Put {
                key: LEADER_KEY.to_string(),
                value,
            }],
            lease: Some(lease),
        };
        match b.commit(&txn) {
            Ok(revision) => Ok(Campaign::Won(Leadership {
                name: self.name.clone(),
                lease,
                revision,
            })),
            // Another candidate claimed it first.
            Err(StoreError::Conflict { .. }) => Ok(Campaign::Held {
                by: current(b)?.map_or_else(|| "nobody".into(), |(c, _)| c.name),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the leadership up at once (the next candidate need not wait
    /// for the lease to lapse).
    pub fn resign<B: Backend>(&mut self, b: &B) -> Result<(), StoreError> {
        if let Some(l) = self.lease.take() {
            b.revoke_lease(l)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryBackend;

    #[test]
    fn one_leads_until_its_lease_is_gone() {
        let b = MemoryBackend::new();
        let mut a = Candidate::new("a", 2_000).unwrap();
        let mut c = Candidate::new("c", 2_000).unwrap();
        let Campaign::Won(la) = a.try_lead(&b).unwrap() else {
            panic!("the first candidate leads")
        };
        assert_eq!(c.try_lead(&b).unwrap(), Campaign::Held { by: "a".into() });
        // Asking again keeps the same claim.
        assert_eq!(a.try_lead(&b).unwrap(), Campaign::Won(la.clone()));
        a.resign(&b).unwrap();
        let Campaign::Won(lc) = c.try_lead(&b).unwrap() else {
            panic!("the second candidate takes over")
        };
        assert!(lc.revision > la.revision);
        assert_eq!(current(&b).unwrap().unwrap().0.name, "c");
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(matches!(
                Candidate::new(n, 1000),
                Err(LeaderError::BadName(_))
            ));
        }
    }
}
