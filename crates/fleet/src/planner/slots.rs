//! The caps' ledger for one planning round: who holds each outbound,
//! inbound, tenant and fleet slot, counting the migrations in flight and
//! those this round starts.

use std::collections::{HashMap, HashSet};

use crate::model::{Fleet, HostIx, VmIx};
use crate::policy::Policies;

use super::{InFlight, WaitReason};

pub struct Slots<'a> {
    fleet: &'a Fleet,
    policies: &'a Policies,
    outbound: HashMap<HostIx, Vec<VmIx>>,
    inbound: HashMap<HostIx, Vec<VmIx>>,
    tenant: HashMap<&'a str, Vec<VmIx>>,
    running: u32,
    migrating: HashSet<VmIx>,
}

impl<'a> Slots<'a> {
    pub fn new(fleet: &'a Fleet, policies: &'a Policies, in_flight: &[InFlight]) -> Self {
        let mut s = Self {
            fleet,
            policies,
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            tenant: HashMap::new(),
            running: 0,
            migrating: HashSet::new(),
        };
        for m in in_flight {
            s.take(m.vm, m.source, m.target);
        }
        s
    }

    pub fn take(&mut self, vm: VmIx, source: HostIx, target: HostIx) {
        self.outbound.entry(source).or_default().push(vm);
        self.inbound.entry(target).or_default().push(vm);
        self.tenant
            .entry(self.fleet.vm(vm).tenant.as_str())
            .or_default()
            .push(vm);
        self.running += 1;
        self.migrating.insert(vm);
    }

    pub fn is_migrating(&self, vm: VmIx) -> bool {
        self.migrating.contains(&vm)
    }

    pub fn running(&self) -> u32 {
        self.running
    }

    /// The migrations running in the tenant.
    pub fn tenant_running(&self, tenant: &str) -> u32 {
        self.tenant.get(tenant).map_or(0, |v| v.len() as u32)
    }

    fn names(&self, vms: &[VmIx]) -> Vec<String> {
        vms.iter().map(|&v| self.fleet.vm(v).id.clone()).collect()
    }

    pub fn tenant_cap(&self, tenant: &str) -> u32 {
        let own = self
            .fleet
            .tenant(tenant)
            .and_then(|t| t.max_concurrent_migrations);
        own.map_or(self.policies.caps.per_tenant, |c| {
            c.min(self.policies.caps.per_tenant)
        })
    }

    /// Why a migration of `vm` off `source` cannot start now, if a source
    /// side slot (fleet, outbound, tenant) is taken.
    pub fn source_side(&self, vm: VmIx, source: HostIx) -> Option<WaitReason> {
        let caps = &self.policies.caps;
        if self.running >= caps.fleet {
            return Some(WaitReason::FleetSlot {
                running: self.running,
                cap: caps.fleet,
            });
        }
        if let Some(holders) = self.outbound.get(&source) {
            if holders.len() as u32 >= caps.host_outbound {
                return Some(WaitReason::OutboundSlot {
                    host: self.fleet.host(source).name.clone(),
                    holders: self.names(holders),
                });
            }
        }
        let tenant = self.fleet.vm(vm).tenant.as_str();
        let cap = self.tenant_cap(tenant);
        if let Some(holders) = self.tenant.get(tenant) {
            if holders.len() as u32 >= cap {
                return Some(WaitReason::TenantSlot {
                    tenant: tenant.to_string(),
                    cap,
                    holders: self.names(holders),
                });
            }
        }
        None
    }

    /// True when the host may receive one more migration.
    pub fn inbound_free(&self, target: HostIx) -> bool {
        self.inbound
            .get(&target)
            .is_none_or(|h| (h.len() as u32) < self.policies.caps.host_inbound)
    }

    pub fn inbound_full(&self, target: HostIx) -> WaitReason {
        WaitReason::InboundSlot {
            host: self.fleet.host(target).name.clone(),
            holders: self.names(self.inbound.get(&target).map_or(&[], Vec::as_slice)),
        }
    }
}
