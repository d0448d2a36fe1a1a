//! What one request of the page reads: the fleet's records as the store
//! holds them now, each host's use summed from the VMs on it, and the
//! migrations as their agents tell them.

use std::collections::BTreeMap;

use serde::Serialize;

use super::frozen::Frozen;
use super::migrations::{MigrationSource, MigrationView};
use crate::hosts;
use crate::model::{Health, Maintenance, Resources, VmRunState};
use crate::plan::{Plan, PlanState};
use crate::store::{Backend, FleetStore, StoreError};
use crate::time::Timestamp;

/// Whether a host's agent keeps its registration alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lease {
    Alive,
    /// Registered, and its lease lapsed: the host is unreachable.
    Lapsed,
    /// Never registered (written by an operator or a seed).
    Unregistered,
}

impl Lease {
    pub fn word(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Lapsed => "lapsed",
            Self::Unregistered => "unregistered",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub name: String,
    pub rack: String,
    pub zone: String,
    pub capacity: Resources,
    /// What the VMs placed on it take.
    pub used: Resources,
    pub vms: usize,
    pub health: Health,
    pub maintenance: Maintenance,
    pub lease: Lease,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmRow {
    pub id: String,
    pub host: String,
    pub tenant: String,
    pub resources: Resources,
    pub state: VmRunState,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub taken_at: Timestamp,
    /// The store's revision when the read began.
    pub revision: u64,
    pub hosts: Vec<HostRow>,
    pub vms: Vec<VmRow>,
    /// Running plans first, then the newest.
    pub plans: Vec<Plan>,
    /// Newest first.
    pub migrations: Vec<MigrationView>,
}

/// Reads the whole view: the store once ([`Frozen`]), then the agents.
pub fn snapshot<B: Backend>(
    live: &B,
    migrations: &dyn MigrationSource,
) -> Result<FleetView, StoreError> {
    let frozen = Frozen::read(live)?;
    let b = &frozen;
    let revision = frozen.revision;
    let store = FleetStore::new(b);
    let vms: Vec<VmRow> = store
        .vms()?
        .into_iter()
        .map(|v| VmRow {
            id: v.value.id,
            host: v.value.host,
            tenant: v.value.tenant,
            resources: v.value.resources,
            state: v.value.state,
        })
        .collect();
    let mut used: BTreeMap<&str, (Resources, usize)> = BTreeMap::new();
    for v in &vms {
        let u = used.entry(v.host.as_str()).or_default();
        u.0 = u.0.plus(v.resources);
        u.1 += 1;
    }
    let hosts = hosts::list(b)?
        .into_iter()
        .map(|s| {
            let (u, n) = used.get(s.host.name.as_str()).copied().unwrap_or_default();
            HostRow {
                rack: s.host.rack().to_string(),
                zone: s.host.zone().to_string(),
                capacity: s.host.capacity,
                used: u,
                vms: n,
                lease: match s.alive {
                    Some(true) => Lease::Alive,
                    Some(false) => Lease::Lapsed,
                    None => Lease::Unregistered,
                },
                name: s.host.name,
                health: s.host.health,
                maintenance: s.host.maintenance,
            }
        })
        .collect();
    let mut plans: Vec<Plan> = store.plans()?.into_iter().map(|v| v.value).collect();
    plans.sort_by_key(|p| {
        (
            p.state != PlanState::Running,
            std::cmp::Reverse(p.created_at),
        )
    });
    let mut migrations = migrations.migrations(b);
    migrations.sort_by_key(|m| std::cmp::Reverse(m.started));
    Ok(FleetView {
        taken_at: Timestamp::now_wall(),
        revision,
        hosts,
        vms,
        plans,
        migrations,
    })
}
