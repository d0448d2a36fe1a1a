//! The embedded backend: one redb file. redb because the agent already
//! keeps its records in it (crates/agent/src/store.rs), so the workspace
//! carries one database engine; it is pure Rust, ACID with a durable
//! commit per write transaction, and it locks its file, so a second
//! scheduler on the same file is refused at open instead of corrupting it.
//!
//! Tables: `kv` (key -> 8-byte little-endian mod revision, then the value),
//! `meta` (the store revision, lease and change counters), `leases`, and
//! `changes` (a bounded history for `changes_since`).

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Backend, Change, Entry, LeaseId, Op, StoreError, Txn, CHANGE_HISTORY};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

const REVISION: &str = "revision";
const NEXT_LEASE: &str = "next_lease";
const NEXT_CHANGE: &str = "next_change";

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn split(stored: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    if stored.len() < 8 {
        return Err(StoreError::Decode {
            what: "entry".into(),
            why: format!("{} bytes, shorter than its revision", stored.len()),
        });
    }
    let (rev, value) = stored.split_at(8);
    Ok((u64::from_le_bytes(rev.try_into().expect("8 bytes")), value))
}

pub struct RedbBackend {
    db: Database,
}

impl RedbBackend {
    /// Opens or creates the file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(KV).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
            txn.open_table(LEASES).map_err(db_err)?;
            txn.open_table(CHANGES).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Opens a file `open` made before, without its table-creating write
    /// (a durable commit): the shared-file backend opens it per call.
    pub(super) fn reopen(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Ok(Self { db })
    }

    fn meta(&self, name: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(META).map_err(db_err)?;
        Ok(t.get(name).map_err(db_err)?.map_or(0, |v| v.value()))
    }
}

impl Backend for RedbBackend {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(KV).map_err(db_err)?;
        let Some(v) = t.get(key).map_err(db_err)? else {
            return Ok(None);
        };
        let (mod_revision, value) = split(v.value())?;
        Ok(Some(Entry {
            key: key.to_string(),
            value: value.to_vec(),
            mod_revision,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(KV).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.range(prefix..).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            let (mod_revision, value) = split(v.value())?;
            out.push(Entry {
                key: k.value().to_string(),
                value: value.to_vec(),
                mod_revision,
            });
        }
        Ok(out)
    }

    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        let rev = {
            if let Some(l) = txn.lease {
                let leases = w.open_table(LEASES).map_err(db_err)?;
                if leases.get(l.0).map_err(db_err)?.is_none() {
                    return Err(StoreError::Fenced(l));
                }
            }
            let mut kv = w.open_table(KV).map_err(db_err)?;
            for (key, expect) in &txn.checks {
                let current = match kv.get(key.as_str()).map_err(db_err)? {
                    Some(v) => Some(split(v.value())?.0),
                    None => None,
                };
                // Returning drops the transaction uncommitted: nothing applies.
                expect.check(key, current)?;
            }
            let mut meta = w.open_table(META).map_err(db_err)?;
            let rev = meta.get(REVISION).map_err(db_err)?.map_or(0, |v| v.value()) + 1;
            let mut next_change = meta
                .get(NEXT_CHANGE)
                .map_err(db_err)?
                .map_or(0, |v| v.value());
            let mut changes = w.open_table(CHANGES).map_err(db_err)?;
            for op in &txn.ops {
                let (key, put) = match op {
                    Op::Put { key, value } => {
                        let mut stored = Vec::with_capacity(8 + value.len());
                        stored.extend_from_slice(&rev.to_le_bytes());
                        stored.extend_from_slice(value);
                        kv.insert(key.as_str(), stored.as_slice()).map_err(db_err)?;
                        (key.clone(), true)
                    }
                    Op::Delete { key } => {
                        kv.remove(key.as_str()).map_err(db_err)?;
                        (key.clone(), false)
                    }
                };
                let change = serde_json::to_vec(&Change {
                    revision: rev,
                    key,
                    put,
                })
                .map_err(db_err)?;
                changes
                    .insert(next_change, change.as_slice())
                    .map_err(db_err)?;
                next_change += 1;
            }
            if changes.len().map_err(db_err)? > CHANGE_HISTORY {
                let cut = next_change.saturating_sub(CHANGE_HISTORY);
                changes.retain_in(..cut, |_, _| false).map_err(db_err)?;
            }
            meta.insert(REVISION, rev).map_err(db_err)?;
            meta.insert(NEXT_CHANGE, next_change).map_err(db_err)?;
            rev
        };
        w.commit().map_err(db_err)?;
        Ok(rev)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.meta(REVISION)
    }

    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut meta = w.open_table(META).map_err(db_err)?;
            let id = meta
                .get(NEXT_LEASE)
                .map_err(db_err)?
                .map_or(0, |v| v.value())
                + 1;
            meta.insert(NEXT_LEASE, id).map_err(db_err)?;
            w.open_table(LEASES)
                .map_err(db_err)?
                .insert(id, ttl_ms)
                .map_err(db_err)?;
            id
        };
        w.commit().map_err(db_err)?;
        Ok(LeaseId(id))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(LEASES).map_err(db_err)?;
        match t.get(lease.0).map_err(db_err)? {
            Some(_) => Ok(()),
            None => Err(StoreError::Fenced(lease)),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        w.open_table(LEASES)
            .map_err(db_err)?
            .remove(lease.0)
            .map_err(db_err)?;
        w.commit().map_err(db_err)
    }

    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(LEASES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            out.push(LeaseId(k.value()));
        }
        Ok(out)
    }

    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(CHANGES).map_err(db_err)?;
        let mut out = Vec::new();
        let mut first = true;
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let c: Change = serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
                what: "change".into(),
                why: e.to_string(),
            })?;
            if first && revision + 1 < c.revision {
                return Err(StoreError::Compacted {
                    asked: revision,
                    oldest: c.revision,
                });
            }
            first = false;
            if c.revision > revision {
                out.push(c);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_store_contract_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("ferry-fleet-redb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.redb");
        {
            let b = RedbBackend::open(&path).unwrap();
            super::super::contract::check(&b);
        }
        let b = RedbBackend::open(&path).unwrap();
        assert_eq!(b.get("hosts/a").unwrap().unwrap().value, b"2");
        assert!(b.revision().unwrap() > 5);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
