//! Host registration: each host (ferryd) writes its record (`hosts/NAME`:
//! capacity, labels, version) and a registration (`alive/NAME`) that names
//! a lease it keeps alive. A registered host whose lease lapsed is
//! unreachable: the leader marks it so, and the planner sends it nothing;
//! when it registers again it is healthy again.
//!
//! The host record is the scheduler's too (health, maintenance), so a
//! registration creates it, or updates only what the host itself knows
//! (capacity, labels, version, CPU features, link), checked against the
//! revision it read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::migrator::Migrator;
use crate::model::{Health, Host, Maintenance};
use crate::scheduler::{Scheduler, SchedulerError};
use crate::store::fleet_store::{Batch, HOSTS};
use crate::store::{Backend, Expect, FleetStore, LeaseId, StoreError};
use crate::time::Timestamp;

/// Registrations, under the store's prefix.
pub const ALIVE: &str = "alive/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub host: String,
    pub lease: LeaseId,
}

/// A host as the registrations see it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostStatus {
    pub host: Host,
    /// None: never registered (a host written by an operator or seed).
    pub alive: Option<bool>,
}

/// Registers `host` under a new lease of `ttl_ms`; keep it alive with
/// [`keep_alive`] well within the TTL.
pub fn register<B: Backend>(b: &B, host: &Host, ttl_ms: u64) -> Result<Registration, StoreError> {
    if host.name.is_empty()
        || !host
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(StoreError::Backend(format!(
            "a host name is letters, digits, '-', '_' or '.'; got {:?}",
            host.name
        )));
    }
    let store = FleetStore::new(b);
    let lease = b.grant_lease(ttl_ms)?;
    let mut batch = Batch::default();
    own_fields(&store, host, &mut batch)?;
    let reg = Registration {
        host: host.name.clone(),
        lease,
    };
    batch.put(format!("{ALIVE}{}", host.name), &reg, Expect::Any)?;
    store.commit(batch, Some(lease))?;
    Ok(reg)
}

/// Adds to `batch` the write of what the host itself knows (capacity,
/// labels, version, CPU features, link, the costs of receiving and of
/// sending a VM) over
/// the stored record, checked against the revision read; nothing if that
/// is what is stored already.
fn own_fields<B: Backend>(
    store: &FleetStore<&B>,
    host: &Host,
    batch: &mut Batch,
) -> Result<(), StoreError> {
    let key = format!("{HOSTS}{}", host.name);
    match store
        .hosts()?
        .into_iter()
        .find(|v| v.value.name == host.name)
    {
        None => batch.host(host, Expect::Absent)?,
        Some(stored) => {
            let mut h = stored.value.clone();
            h.capacity = host.capacity;
            h.labels = host.labels.clone();
            h.version = host.version;
            h.cpu_features = host.cpu_features.clone();
            h.link_bytes_per_sec = host.link_bytes_per_sec;
            h.receive_setup = host.receive_setup;
            h.send_setup_ms = host.send_setup_ms;
            if h != stored.value {
                batch.put(key, &h, Expect::At(stored.revision))?;
            }
        }
    }
    Ok(())
}

/// Writes what the host itself knows anew while it stays registered (a
/// new measurement of what moving a VM costs here), under its lease;
/// false when it was left for later: a host being drained is the
/// scheduler's to write until the drain ends (a write of ours would cost
/// it a reload of the fleet at the drain's last step). A `Conflict` means
/// the scheduler wrote the record meanwhile: call again.
pub fn update_own<B: Backend>(b: &B, host: &Host, reg: &Registration) -> Result<bool, StoreError> {
    let store = FleetStore::new(b);
    let draining = store.hosts()?.iter().any(|v| {
        v.value.name == host.name && matches!(v.value.maintenance, Maintenance::Draining { .. })
    });
    if draining {
        return Ok(false);
    }
    let mut batch = Batch::default();
    own_fields(&store, host, &mut batch)?;
    if !batch.is_empty() {
        store.commit(batch, Some(reg.lease))?;
    }
    Ok(true)
}

/// Keeps a registration alive; `Fenced` once it lapsed (register again).
pub fn keep_alive<B: Backend>(b: &B, reg: &Registration) -> Result<(), StoreError> {
    b.keep_alive(reg.lease)
}

/// Ends a registration at once: the host is unreachable from now on.
pub fn deregister<B: Backend>(b: &B, reg: &Registration) -> Result<(), StoreError> {
    b.revoke_lease(reg.lease)
}

/// Which registered hosts are alive, by name.
pub fn liveness<B: Backend>(b: &B) -> Result<BTreeMap<String, bool>, StoreError> {
    let live = b.live_leases()?;
    let mut out = BTreeMap::new();
    for e in b.list(ALIVE)? {
        let reg: Registration =
            serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode {
                what: e.key.clone(),
                why: err.to_string(),
            })?;
        out.insert(reg.host, live.contains(&reg.lease));
    }
    Ok(out)
}

/// Every host record with its registration's state.
pub fn list<B: Backend>(b: &B) -> Result<Vec<HostStatus>, StoreError> {
    let alive = liveness(b)?;
    Ok(FleetStore::new(b)
        .hosts()?
        .into_iter()
        .map(|v| HostStatus {
            alive: alive.get(&v.value.name).copied(),
            host: v.value,
        })
        .collect())
}

/// The leader's side: a registered host whose lease lapsed becomes
/// unreachable, one that registered again becomes healthy again (a
/// degraded host stays degraded). Returns the hosts it changed.
pub fn apply_liveness<B: Backend, M: Migrator>(
    s: &mut Scheduler<B, M>,
    now: Timestamp,
) -> Result<Vec<String>, SchedulerError> {
    let alive = liveness(s.store().backend())?;
    let mut changed = Vec::new();
    for (name, up) in alive {
        let Some(h) = s.fleet().host_ix(&name) else {
            // Registered after this scheduler loaded the fleet: the
            // next load (a new leader, or a reload) takes it in.
            continue;
        };
        let health = &s.fleet().host(h).health;
        let next = match (up, health) {
            (false, Health::Healthy) => Health::Unreachable { since: now },
            (true, Health::Unreachable { .. }) => Health::Healthy,
            _ => continue,
        };
        s.set_health(&name, next)?;
        changed.push(name);
    }
    Ok(changed)
}
