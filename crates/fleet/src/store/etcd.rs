//! A backend on etcd's v3 API (Debian's etcd-server 3.4), for a fleet run
//! across machines. The store's shape is etcd's, so each call maps to one
//! etcd request:
//! - keys live under a prefix (`/ferry/fleet/` by default);
//! - a revision is etcd's `mod_revision`, the store revision its header's;
//! - `Expect::Absent` is `version == 0`, `Expect::At(r)` is
//!   `mod_revision == r`, and a transaction is one etcd `Txn`;
//! - a lease is an etcd lease with a marker key `PREFIX/leases/ID`
//!   attached to it: a transaction under a lease compares that key's lease,
//!   so once the lease is revoked or lapsed (etcd deletes the key) the
//!   write is refused inside the same `Txn`, with no window between a check
//!   and the write (fencing);
//! - `changes_since` replays etcd's watch history from a revision, and
//!   [`EtcdBackend::watch`] follows changes as they happen.
//!
//! The [`Backend`] trait is synchronous (the scheduler is a plain loop), so
//! the backend owns a small tokio runtime with one worker thread: the gRPC
//! connection's tasks run there, and each call blocks on its request with
//! a timeout. It must not be called from inside another tokio runtime.

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, TxnOp,
    WatchOptions,
};

use super::{Backend, Change, Entry, Expect, LeaseId, Op, StoreError, Txn};

/// Where the fleet's keys live unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/ferry/fleet/";
/// Marker keys of live leases, under the prefix.
const LEASES: &str = "leases/";
/// How long one request may take before the store is called unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `changes_since` waits for the watch to replay history.
const REPLAY_QUIET: Duration = Duration::from_millis(300);

pub struct EtcdBackend {
    rt: tokio::runtime::Runtime,
    client: Client,
    prefix: String,
    endpoint: String,
}

fn to_rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn from_rev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

impl EtcdBackend {
    /// Connects to etcd at `endpoint` (`http://127.0.0.1:2379`), keeping
    /// keys under `prefix` (it must end in `/`).
    pub fn connect(endpoint: &str, prefix: &str) -> Result<Self, StoreError> {
        if !prefix.ends_with('/') {
            return Err(StoreError::Backend(format!(
                "the etcd key prefix {prefix:?} must end in '/'"
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-etcd")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the etcd client runtime: {e}"))
            })?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = rt
            .block_on(async {
                tokio::time::timeout(REQUEST_TIMEOUT, Client::connect([endpoint], Some(opts))).await
            })
            .map_err(|_| unreachable(endpoint, "connect timed out"))?
            .map_err(|e| unreachable(endpoint, &e.to_string()))?;
        let b = Self {
            rt,
            client,
            prefix: prefix.to_string(),
            endpoint: endpoint.to_string(),
        };
        // etcd connects lazily: ask for something now, so that a wrong
        // address is an error here rather than at the first write.
        b.revision()?;
        Ok(b)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn lease_key(&self, lease: LeaseId) -> String {
        self.key(&format!("{LEASES}{}", lease.0))
    }

    fn strip<'a>(&self, key: &'a [u8]) -> Result<&'a str, StoreError> {
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
            .ok_or_else(|| StoreError::Decode {
                what: String::from_utf8_lossy(key).into_owned(),
                why: format!("not a UTF-8 key under {}", self.prefix),
            })
    }

    /// Runs one request on the runtime, bounded by [`REQUEST_TIMEOUT`].
    fn run<T, F>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, f).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unreachable(&self.endpoint, &format!("{what}: {e}"))),
            Err(_) => Err(unreachable(
                &self.endpoint,
                &format!("{what}: no answer in {REQUEST_TIMEOUT:?}"),
            )),
        }
    }

    /// Follows every change under the prefix after `revision`, as they
    /// happen, in batches as etcd sends them (a transaction's changes are
    /// in one), until the receiver is dropped or the watch ends (a
    /// compaction, or etcd gone: then the last message is the error).
    pub fn watch(&self, revision: u64) -> mpsc::Receiver<Result<Vec<Change>, StoreError>> {
        let (tx, rx) = mpsc::channel();
        let mut client = self.client.clone();
        let prefix = self.prefix.clone();
        let endpoint = self.endpoint.clone();
        self.rt.spawn(async move {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(from_rev(revision + 1));
            let mut stream = match client.watch(prefix.clone(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(unreachable(&endpoint, &format!("watch: {e}"))));
                    return;
                }
            };
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(unreachable(&endpoint, &format!("watch: {e}"))));
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx.send(Err(StoreError::Compacted {
                        asked: revision,
                        oldest: to_rev(msg.compact_revision()),
                    }));
                    return;
                }
                let mut batch = Vec::new();
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(key) = key.strip_prefix(prefix.as_str()) else {
                        continue;
                    };
                    batch.push(Change {
                        revision: to_rev(kv.mod_revision()),
                        key: key.to_string(),
                        put: ev.event_type() == EventType::Put,
                    });
                }
                if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Why a transaction that etcd refused was refused: the lease first,
    /// then the first check that does not hold now. Read after the fact,
    /// for the message only.
    fn refusal(&self, txn: &Txn) -> StoreError {
        if let Some(l) = txn.lease {
            match self.get(&format!("{LEASES}{}", l.0)) {
                Ok(Some(_)) => {}
                Ok(None) => return StoreError::Fenced(l),
                Err(e) => return e,
            }
        }
        for (key, expect) in &txn.checks {
            match self.get(key) {
                Ok(cur) => {
                    if let Err(e) = expect.check(key, cur.map(|e| e.mod_revision)) {
                        return e;
                    }
                }
                Err(e) => return e,
            }
        }
        StoreError::Conflict {
            key: txn
                .checks
                .first()
                .map_or_else(String::new, |(k, _)| k.clone()),
            expected: "what it was read at".into(),
            found: "a value that changed and changed back".into(),
        }
    }
}

fn unreachable(endpoint: &str, why: &str) -> StoreError {
    StoreError::Backend(format!(
        "etcd at {endpoint} is unreachable ({why}): no new moves are scheduled until it answers"
    ))
}

impl Backend for EtcdBackend {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.run("get", kv.get(self.key(key), None))?;
        Ok(resp.kvs().first().map(|e| Entry {
            key: key.to_string(),
            value: e.value().to_vec(),
            mod_revision: to_rev(e.mod_revision()),
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.run(
            "list",
            kv.get(self.key(prefix), Some(GetOptions::new().with_prefix())),
        )?;
        resp.kvs()
            .iter()
            .map(|e| {
                Ok(Entry {
                    key: self.strip(e.key())?.to_string(),
                    value: e.value().to_vec(),
                    mod_revision: to_rev(e.mod_revision()),
                })
            })
            .collect()
    }

    fn commit(&self, txn: &Txn) -> Result<u64, StoreError> {
        let mut when = Vec::new();
        if let Some(l) = txn.lease {
            let id = i64::try_from(l.0).map_err(|_| StoreError::Fenced(l))?;
            when.push(Compare::lease(self.lease_key(l), CompareOp::Equal, id));
        }
        for (key, expect) in &txn.checks {
            match expect {
                Expect::Any => {}
                Expect::Absent => when.push(Compare::version(self.key(key), CompareOp::Equal, 0)),
                Expect::At(r) => when.push(Compare::mod_revision(
                    self.key(key),
                    CompareOp::Equal,
                    from_rev(*r),
                )),
            }
        }
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.key(key), None),
            })
            .collect();
        let n_ops = ops.len();
        let mut kv = self.client.kv_client();
        let resp = self
            .run(
                "commit",
                kv.txn(etcd_client::Txn::new().when(when).and_then(ops)),
            )
            .map_err(|e| {
                if e.to_string().contains("too many operations") {
                    StoreError::Backend(format!(
                        "etcd at {} refused a transaction of {n_ops} writes (its --max-txn-ops, 128 by default, is lower): \
                         start etcd with --max-txn-ops above the largest plan's VM count",
                        self.endpoint
                    ))
                } else {
                    e
                }
            })?;
        if !resp.succeeded() {
            return Err(self.refusal(txn));
        }
        Ok(resp.header().map_or(0, |h| to_rev(h.revision())))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let mut kv = self.client.kv_client();
        // A read of one absent key is the cheapest way to the header.
        let resp = self.run(
            "revision",
            kv.get(
                self.key("revision-probe"),
                Some(GetOptions::new().with_count_only()),
            ),
        )?;
        Ok(resp.header().map_or(0, |h| to_rev(h.revision())))
    }

    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        // etcd counts in seconds, and raises a TTL below its minimum.
        let ttl_s = i64::try_from(ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let mut c = self.client.clone();
        let granted = self.run("grant a lease", c.lease_grant(ttl_s, None))?;
        let id = granted.id();
        let lease =
            LeaseId(u64::try_from(id).map_err(|_| {
                StoreError::Backend(format!("etcd granted a negative lease id {id}"))
            })?);
        let mut kv = self.client.kv_client();
        self.run(
            "mark the lease",
            kv.put(
                self.lease_key(lease),
                Vec::new(),
                Some(PutOptions::new().with_lease(id)),
            ),
        )?;
        Ok(lease)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = i64::try_from(lease.0).map_err(|_| StoreError::Fenced(lease))?;
        let mut c = self.client.clone();
        let ttl = match self.run("keep a lease alive", async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |r| r.ttl()))
        }) {
            Ok(ttl) => ttl,
            Err(e) if e.to_string().contains("lease not found") => 0,
            Err(e) => return Err(e),
        };
        // etcd answers a keep-alive of a lapsed lease with a TTL of 0.
        if ttl <= 0 {
            return Err(StoreError::Fenced(lease));
        }
        Ok(())
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = i64::try_from(lease.0).map_err(|_| StoreError::Fenced(lease))?;
        let mut c = self.client.clone();
        match self.run("revoke a lease", c.lease_revoke(id)) {
            Ok(_) => Ok(()),
            // Revoking a lease that already lapsed is what was asked.
            Err(e) if e.to_string().contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn live_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        self.list(LEASES)?
            .into_iter()
            .map(|e| {
                e.key[LEASES.len()..]
                    .parse()
                    .map(LeaseId)
                    .map_err(|_| StoreError::Decode {
                        what: e.key.clone(),
                        why: "a lease marker whose name is not a lease id".into(),
                    })
            })
            .collect()
    }

    fn changes_since(&self, revision: u64) -> Result<Vec<Change>, StoreError> {
        let now = self.revision()?;
        if revision >= now {
            return Ok(Vec::new());
        }
        let rx = self.watch(revision);
        let mut out = Vec::new();
        // History up to `now` replays at once; a change of a key outside
        // the prefix may hold the last revision, so a quiet watch ends the
        // replay too. Bounded: at most `now - revision` revisions.
        loop {
            match rx.recv_timeout(REPLAY_QUIET) {
                Ok(Ok(batch)) => {
                    let last = batch.iter().any(|c| c.revision >= now);
                    out.extend(batch.into_iter().filter(|c| c.revision <= now));
                    if last {
                        break;
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        Ok(out)
    }
}
