//! Target choice. Every host that may receive VMs (healthy, not due for
//! maintenance) sits in an ordered index by the memory it has free below
//! its headroom, less what in-flight migrations and restarts reserved
//! there. A VM's candidates are read from the most free downwards, so the
//! scan stops at the first host too small and usually ends at one of the
//! first few: the VM goes where the most room is (spreading the fleet's
//! load and its inbound traffic), among hosts that offer its CPU features,
//! run a version its state can move to, hold no VM of its anti-affinity
//! groups and have an inbound slot.

use std::collections::{BTreeSet, HashMap};

use crate::model::{Fleet, HostIx, Resources, VmIx};
use crate::policy::Policies;

use super::slots::Slots;
use super::{InFlight, WaitReason};

pub struct Targets<'a> {
    fleet: &'a Fleet,
    free: Vec<Resources>,
    by_free_mem: BTreeSet<(u64, HostIx)>,
    /// Anti-affinity members on their way to a host.
    reserved_groups: HashMap<(usize, HostIx), u32>,
}

/// Why the candidates that had room were refused, counted for the reason.
#[derive(Default)]
struct Refusals {
    vcpus: u32,
    features: u32,
    version: u32,
    affinity: u32,
    avoided: u32,
    inbound_full: Option<HostIx>,
}

impl<'a> Targets<'a> {
    pub fn new(fleet: &'a Fleet, policies: &Policies, in_flight: &[InFlight]) -> Self {
        let mut free: Vec<Resources> = fleet
            .hosts()
            .iter()
            .enumerate()
            .map(|(h, host)| {
                host.capacity
                    .less_headroom(policies.headroom_percent)
                    .minus(fleet.used(h))
            })
            .collect();
        let mut reserved_groups = HashMap::new();
        for m in in_flight {
            free[m.target] = free[m.target].minus(fleet.vm(m.vm).resources);
            for &g in fleet.vm_groups(m.vm) {
                *reserved_groups.entry((g, m.target)).or_insert(0) += 1;
            }
        }
        let by_free_mem = fleet
            .hosts()
            .iter()
            .enumerate()
            .filter(|(_, host)| host.accepts_vms())
            .map(|(h, _)| (free[h].mem_bytes, h))
            .collect();
        Self {
            fleet,
            free,
            by_free_mem,
            reserved_groups,
        }
    }

    /// The host is no candidate for this round (it is about to be drained).
    pub fn exclude(&mut self, h: HostIx) {
        self.by_free_mem.remove(&(self.free[h].mem_bytes, h));
    }

    /// `vm` is on its way to (or restarting on) `target`.
    pub fn reserve(&mut self, vm: VmIx, target: HostIx) {
        let was = self.free[target];
        self.free[target] = was.minus(self.fleet.vm(vm).resources);
        if self.by_free_mem.remove(&(was.mem_bytes, target)) {
            self.by_free_mem
                .insert((self.free[target].mem_bytes, target));
        }
        for &g in self.fleet.vm_groups(vm) {
            *self.reserved_groups.entry((g, target)).or_insert(0) += 1;
        }
    }

    fn holds_group(&self, vm: VmIx, h: HostIx) -> Option<usize> {
        self.fleet.vm_groups(vm).iter().copied().find(|&g| {
            self.fleet.group_count(g, h) > 0 || self.reserved_groups.contains_key(&(g, h))
        })
    }

    /// Why `h` cannot take `vm` coming from `source`, capacity and
    /// compatibility only (not slots).
    pub fn refuse(&self, vm: VmIx, source: HostIx, h: HostIx) -> Option<String> {
        let f = self.fleet;
        let host = f.host(h);
        if h == source {
            return Some(format!("{} is the VM's own host", host.name));
        }
        if let Some(why) = host.refusal() {
            return Some(why);
        }
        let need = f.vm(vm).resources;
        if !self.free[h].holds(need) {
            return Some(format!(
                "{} has {} and {} vCPUs free below its headroom",
                host.name,
                crate::model::resources::show_bytes(self.free[h].mem_bytes),
                self.free[h].vcpus
            ));
        }
        let missing = f.vm_features(vm) & !f.host_features(h);
        if missing != 0 {
            return Some(format!(
                "{} lacks CPU features {}",
                host.name,
                f.feature_names(missing).join(", ")
            ));
        }
        let (from, to) = (f.host(source).version, host.version);
        if !from.can_migrate_to(to) {
            return Some(format!(
                "{} runs Ferry {to}; a VM from {from} moves at most one minor version",
                host.name
            ));
        }
        if let Some(g) = self.holds_group(vm, h) {
            return Some(format!(
                "{} holds a VM of anti-affinity group {}",
                host.name,
                f.group_name(g)
            ));
        }
        None
    }

    /// The best target for a migration of `vm`, or why there is none now.
    /// With `slots`, a target must have an inbound slot; without (a
    /// restart), capacity and compatibility alone decide.
    pub fn choose(
        &self,
        vm: VmIx,
        source: HostIx,
        avoid: &[HostIx],
        slots: Option<&Slots<'_>>,
    ) -> Result<HostIx, WaitReason> {
        let f = self.fleet;
        let need = f.vm(vm).resources;
        let (src_features, src_version) = (f.vm_features(vm), f.host(source).version);
        let mut refused = Refusals::default();
        for &(free_mem, h) in self.by_free_mem.iter().rev() {
            if free_mem < need.mem_bytes {
                break;
            }
            if h == source {
                continue;
            }
            if avoid.contains(&h) {
                refused.avoided += 1;
                continue;
            }
            if self.free[h].vcpus < need.vcpus {
                refused.vcpus += 1;
                continue;
            }
            if src_features & !f.host_features(h) != 0 {
                refused.features += 1;
                continue;
            }
            if !src_version.can_migrate_to(f.host(h).version) {
                refused.version += 1;
                continue;
            }
            if self.holds_group(vm, h).is_some() {
                refused.affinity += 1;
                continue;
            }
            if let Some(s) = slots {
                if !s.inbound_free(h) {
                    refused.inbound_full.get_or_insert(h);
                    continue;
                }
            }
            return Ok(h);
        }
        if let (Some(h), Some(s)) = (refused.inbound_full, slots) {
            return Err(s.inbound_full(h));
        }
        let mut parts = Vec::new();
        let mut part = |n: u32, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        };
        part(refused.vcpus, "with the memory lack the vCPUs");
        part(refused.features, "lack its CPU features");
        part(refused.version, "run a version it cannot move to");
        part(refused.affinity, "hold a VM of its anti-affinity group");
        part(refused.avoided, "failed it before");
        let detail = if parts.is_empty() {
            match self.by_free_mem.iter().rev().find(|&&(_, h)| h != source) {
                Some(&(largest, _)) => format!(
                    "the most any other host that accepts VMs has is {}",
                    crate::model::resources::show_bytes(largest)
                ),
                None => "no other host accepts VMs (all are unhealthy or in maintenance)".into(),
            }
        } else {
            format!("of the hosts with the memory, {}", parts.join(", "))
        };
        Err(WaitReason::NoTarget {
            mem_bytes: need.mem_bytes,
            vcpus: need.vcpus,
            detail,
        })
    }
}
