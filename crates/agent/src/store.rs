//! The VM records, one redb table keyed by VM id, each value the record
//! as JSON. Every change is one write transaction, durable when it returns.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::model::VmRecord;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the database {path}: {source} (is another ferryd using this state directory?)"
    )]
    Open {
        path: String,
        source: Box<redb::DatabaseError>,
    },
    #[error("database: {0}")]
    Db(String),
    #[error("a stored record does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database file; redb locks it, so a second
    /// agent on the same state directory is refused here.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(VMS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Inserts or replaces a record.
    pub fn put(&self, record: &VmRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(VMS).map_err(db_err)?;
            table
                .insert(record.id.as_str(), value.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Inserts a record only if no record has its id; false if one had.
    pub fn insert_new(&self, record: &VmRecord) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(record)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(VMS).map_err(db_err)?;
            if table.get(record.id.as_str()).map_err(db_err)?.is_some() {
                return Ok(false);
            }
            table
                .insert(record.id.as_str(), value.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    pub fn get(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(VMS).map_err(db_err)?;
        let Some(value) = table.get(id).map_err(db_err)? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(value.value())?))
    }

    /// Every record, ordered by id.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(VMS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (_, value) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    /// Removes a record; false if there was none.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let existed = {
            let mut table = txn.open_table(VMS).map_err(db_err)?;
            let existed = table.remove(id).map_err(db_err)?.is_some();
            existed
        };
        txn.commit().map_err(db_err)?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MigrationPolicy, VmDefinition, VmState};

    fn record(id: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            definition: VmDefinition {
                mem_bytes: 64 << 20,
                vcpus: 1,
                workload: "idle".into(),
                guest: None,
                prealloc: false,
                net: None,
                disk: None,
            },
            policy: MigrationPolicy::default(),
            state: VmState::Running,
            reason: None,
            pid: Some(42),
            pid_start_time: Some(7),
            api_socket: "/tmp/a.sock".into(),
            log: "/tmp/a.log".into(),
            created_at: "2026-12-02T00:00:00.000Z".into(),
            tap: None,
        }
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vms.redb");
        {
            let store = Store::open(&path).unwrap();
            assert!(store.insert_new(&record("b")).unwrap());
            assert!(store.insert_new(&record("a")).unwrap());
            assert!(!store.insert_new(&record("a")).unwrap());
            let mut failed = record("b");
            failed.state = VmState::Failed;
            store.put(&failed).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.list().unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(store.get("b").unwrap().unwrap().state, VmState::Failed);
        assert!(store.remove("a").unwrap());
        assert!(!store.remove("a").unwrap());
        assert!(store.get("a").unwrap().is_none());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
