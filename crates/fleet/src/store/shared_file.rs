//! The embedded store shared by several processes of one machine: the
//! agents registering themselves and the scheduler. redb locks its file
//! for as long as a `Database` is open, so [`RedbBackend`] belongs to one
//! process; this backend opens the file for each call and closes it
//! after, waiting (bounded) while another process holds it. Each call is
//! one redb transaction or a few under one open, so it is atomic against
//! the other processes.
//!
//! Leases here lapse: a lease's deadline (wall clock, shared by every
//! process on the machine) is kept beside it and moved on by each
//! keep-alive, and a lease past its deadline is revoked by the next call
//! that looks at it. (The one-process store's leases live until revoked,
//! since nobody else could notice its death.) The deadlines live under
//! [`DEADLINES`], a prefix `list` and `changes_since` never show.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::embedded::RedbBackend;
use super::{Backend, Change, Entry, Expect, LeaseId, Op, StoreError, Txn};
use crate::time::Timestamp;

/// Where lease deadlines are kept (a NUL first byte: no record key starts
/// so).
pub const DEADLINES: &str = "\u{0}lease-deadline/";

/// The longest wait for another process to close the file.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SharedFileBackend {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Deadline {
    ttl_ms: u64,
    until_ms: u64,
}

fn deadline_key(l: LeaseId) -> String {
    format!("{DEADLINES}{}", l.0)
}

impl SharedFileBackend {
    /// Creates the file if it is missing (and checks it opens).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // The first open makes the tables; later ones only open the file.
        drop(Self::wait_for(path, RedbBackend::open)?);
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the file open, waiting while another process has it.
    fn with<T>(
        &self,
        f: impl FnOnce(&RedbBackend) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&Self::wait_for(&self.path, RedbBackend::reopen)?)
    }

    /// Opens the file with `open`, waiting (bounded) while another process
    /// holds it.
    fn wait_for(
        path: &Path,
        open: impl Fn(&Path) -> Result<RedbBackend, StoreError>,
    ) -> Result<RedbBackend, StoreError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match open(path) {
                Ok(db) => return Ok(db),
                Err(StoreError::Open { why, .. })
                    if why.contains("already open") && started.elapsed() < OPEN_WAIT =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Revokes `l` if its deadline has passed; true if it is alive.
    fn alive(db: &RedbBackend, l: LeaseId, now: u64) -> Result<bool, StoreError> {
        if !db.live_leases()?.contains(&l) {
            return Ok(false);
        }
        let Some(e) = db.get(&deadline_key(l))? else {
            // Granted by a one-process store on the same file: no TTL.
            return Ok(true);
        };
        let d: Deadline = decode(&e)?;
        if now <= d.until_ms {
            return Ok(true);
        }
        db.revoke_lease(l)?;
        db.commit(&Txn {
            ops: vec![Op::Delete { key: e.key }],
            ..Txn::default()
        })?;
        Ok(false)
    }
}

fn decode(e: &Entry) -> Result<Deadline, StoreError> {
    serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode {
        what: e.key.clone(),
        why: err.to_string(),
    })
}

fn put_deadline(db: &RedbBackend, l: LeaseId, ttl_ms: u64, now: u64) -> Result<(), StoreError> {
    let value = serde_json::to_vec(&Deadline {
        ttl_ms,
        until_ms: now.saturating_add(ttl_ms),
    })
    .map_err(|e| StoreError::Backend(e.to_string()))?;
    db.commit(&Txn {
        checks: vec![(deadline_key(l), Expect::Any)],
        ops: vec![Op::Put {
            key: deadline_key(l),
            value,
        }],
        lease: None,
    })?;
    Ok(())
}

fn now_ms() -> u64 {
    Timestamp::now_wall().ms()
}

impl Backend for SharedFileBackend {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.with(|db| db.get(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = self.with(|db| db.list(prefix))?;
        out.retain(|e| !e.key.starts_with(DEADLINES));
        Ok(out)
    }

    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        self.with(|db| {
            if let Some(l) = txn.lease {
                if !Self::alive(db, l, now_ms())? {
                    return Err(StoreError::Fenced(l));
                }
            }
            db.commit(txn)
        })
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.with(|db| db.revision())
    }

    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        self.with(|db| {
            let l = db.grant_lease(ttl_ms)?;
            put_deadline(db, l, ttl_ms, now_ms())?;
            Ok(l)
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.with(|db| {
            let now = now_ms();
            if !Self::alive(db, lease, now)? {
                return Err(StoreError::Fenced(lease));
            }
            if let Some(e) = db.get(&deadline_key(lease))? {
                put_deadline(db, lease, decode(&e)?.ttl_ms, now)?;
            }
            Ok(())
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.with(|db| {
            db.revoke_lease(lease)?;
            db.commit(&Txn {
                ops: vec![Op::Delete {
                    key: deadline_key(lease),
                }],
                ..Txn::default()
            })?;
            Ok(())
        })
    }

    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        self.with(|db| {
            let now = now_ms();
            let mut out = Vec::new();
            for l in db.live_leases()? {
                if Self::alive(db, l, now)? {
                    out.push(l);
                }
            }
            Ok(out)
        })
    }

    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        let mut out = self.with(|db| db.changes_since(revision))?;
        out.retain(|c| !c.key.starts_with(DEADLINES));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-fleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keeps_the_store_contract_with_two_openers_and_leases_lapse() {
        let d = dir("shared");
        let path = d.join("fleet.redb");
        let a = SharedFileBackend::open(&path).unwrap();
        super::super::contract::check(&a);
        // A second opener (another process would do the same) sees it all.
        let b = SharedFileBackend::open(&path).unwrap();
        assert_eq!(b.get("hosts/a").unwrap().unwrap().value, b"2");
        assert!(b
            .list("")
            .unwrap()
            .iter()
            .all(|e| !e.key.starts_with(DEADLINES)));

        let short = a.grant_lease(1_000).unwrap();
        assert!(b.live_leases().unwrap().contains(&short));
        b.keep_alive(short).unwrap();
        std::thread::sleep(Duration::from_millis(1_300));
        assert!(!b.live_leases().unwrap().contains(&short));
        assert!(matches!(a.keep_alive(short), Err(StoreError::Fenced(_))));
        let txn = Txn {
            ops: vec![Op::Put {
                key: "x".into(),
                value: b"1".to_vec(),
            }],
            lease: Some(short),
            ..Txn::default()
        };
        assert!(matches!(a.commit(&txn), Err(StoreError::Fenced(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
