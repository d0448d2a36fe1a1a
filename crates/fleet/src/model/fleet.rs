//! The whole fleet, indexed for the planner: hosts and VMs by position,
//! the VMs on each host, each host's use, CPU features as bit masks and
//! anti-affinity groups counted per host. Built once from the store's
//! records and kept up to date move by move, so that a planning round
//! costs what its work costs, not what the fleet's size costs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Health, Host, Maintenance, Resources, Tenant, Vm, VmRunState};

/// A host's position in the fleet.
pub type HostIx = usize;
/// A VM's position in the fleet.
pub type VmIx = usize;

/// Feature masks are 128 bits wide.
pub const MAX_FEATURES: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FleetError {
    #[error("two hosts are named {0}")]
    DuplicateHost(String),
    #[error("two VMs have the id {0}")]
    DuplicateVm(String),
    #[error("VM {vm} runs on host {host}, which the fleet does not know")]
    VmOnUnknownHost { vm: String, host: String },
    #[error("no host {0} in the fleet")]
    UnknownHost(String),
    #[error("no VM {0} in the fleet")]
    UnknownVm(String),
    #[error("the fleet names more than {MAX_FEATURES} distinct CPU features; the planner's masks hold {MAX_FEATURES}")]
    TooManyFeatures,
}

#[derive(Debug, Clone, Default)]
pub struct Fleet {
    hosts: Vec<Host>,
    host_ix: HashMap<String, HostIx>,
    vms: Vec<Vm>,
    vm_ix: HashMap<String, VmIx>,
    vm_host: Vec<HostIx>,
    on_host: Vec<BTreeSet<VmIx>>,
    used: Vec<Resources>,
    feature_bit: HashMap<String, u32>,
    host_features: Vec<u128>,
    vm_features: Vec<u128>,
    group_ix: HashMap<String, usize>,
    vm_groups: Vec<Vec<usize>>,
    group_hosts: Vec<HashMap<HostIx, u32>>,
    tenants: BTreeMap<String, Tenant>,
}

impl Fleet {
    pub fn new(hosts: Vec<Host>, vms: Vec<Vm>, tenants: Vec<Tenant>) -> Result<Self, FleetError> {
        let mut f = Fleet::default();
        for t in tenants {
            f.tenants.insert(t.name.clone(), t);
        }
        for h in hosts {
            if f.host_ix.contains_key(&h.name) {
                return Err(FleetError::DuplicateHost(h.name));
            }
            let mask = f.mask(&h.cpu_features)?;
            f.host_ix.insert(h.name.clone(), f.hosts.len());
            f.host_features.push(mask);
            f.hosts.push(h);
            f.on_host.push(BTreeSet::new());
            f.used.push(Resources::default());
        }
        for v in vms {
            if f.vm_ix.contains_key(&v.id) {
                return Err(FleetError::DuplicateVm(v.id));
            }
            let Some(&h) = f.host_ix.get(&v.host) else {
                return Err(FleetError::VmOnUnknownHost {
                    vm: v.id,
                    host: v.host,
                });
            };
            let ix = f.vms.len();
            let mask = f.mask(&v.cpu_features)?;
            let groups = v
                .anti_affinity
                .iter()
                .map(|g| {
                    let next = f.group_ix.len();
                    let gi = *f.group_ix.entry(g.clone()).or_insert(next);
                    if gi == f.group_hosts.len() {
                        f.group_hosts.push(HashMap::new());
                    }
                    gi
                })
                .collect();
            f.tenants.entry(v.tenant.clone()).or_insert_with(|| Tenant {
                name: v.tenant.clone(),
                max_concurrent_migrations: None,
            });
            f.vm_ix.insert(v.id.clone(), ix);
            f.vm_features.push(mask);
            f.vm_groups.push(groups);
            f.vm_host.push(h);
            f.vms.push(v);
            if f.vms[ix].is_running() {
                f.place(ix, h);
            }
        }
        Ok(f)
    }

    fn mask(&mut self, features: &BTreeSet<String>) -> Result<u128, FleetError> {
        let mut m = 0u128;
        for name in features {
            let next = self.feature_bit.len() as u32;
            let bit = *self.feature_bit.entry(name.clone()).or_insert(next);
            if bit as usize >= MAX_FEATURES {
                return Err(FleetError::TooManyFeatures);
            }
            m |= 1u128 << bit;
        }
        Ok(m)
    }

    fn place(&mut self, v: VmIx, h: HostIx) {
        self.vm_host[v] = h;
        self.on_host[h].insert(v);
        self.used[h] = self.used[h].plus(self.vms[v].resources);
        for &g in &self.vm_groups[v] {
            *self.group_hosts[g].entry(h).or_insert(0) += 1;
        }
        self.vms[v].host = self.hosts[h].name.clone();
    }

    fn unplace(&mut self, v: VmIx) {
        let h = self.vm_host[v];
        if self.on_host[h].remove(&v) {
            self.used[h] = self.used[h].minus(self.vms[v].resources);
            for &g in &self.vm_groups[v] {
                if let Some(n) = self.group_hosts[g].get_mut(&h) {
                    *n -= 1;
                    if *n == 0 {
                        self.group_hosts[g].remove(&h);
                    }
                }
            }
        }
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    pub fn host(&self, h: HostIx) -> &Host {
        &self.hosts[h]
    }

    pub fn vm(&self, v: VmIx) -> &Vm {
        &self.vms[v]
    }

    pub fn host_ix(&self, name: &str) -> Option<HostIx> {
        self.host_ix.get(name).copied()
    }

    pub fn vm_ix(&self, id: &str) -> Option<VmIx> {
        self.vm_ix.get(id).copied()
    }

    /// The host a VM runs on (or last ran on).
    pub fn vm_host(&self, v: VmIx) -> HostIx {
        self.vm_host[v]
    }

    /// The running VMs of a host, in id order of insertion.
    pub fn vms_on(&self, h: HostIx) -> impl Iterator<Item = VmIx> + '_ {
        self.on_host[h].iter().copied()
    }

    /// What the running VMs of a host take.
    pub fn used(&self, h: HostIx) -> Resources {
        self.used[h]
    }

    pub fn host_features(&self, h: HostIx) -> u128 {
        self.host_features[h]
    }

    pub fn vm_features(&self, v: VmIx) -> u128 {
        self.vm_features[v]
    }

    /// The names of the features in `mask`.
    pub fn feature_names(&self, mask: u128) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .feature_bit
            .iter()
            .filter(|(_, &b)| mask & (1u128 << b) != 0)
            .map(|(n, _)| n.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    /// The anti-affinity groups of a VM, as indexes.
    pub fn vm_groups(&self, v: VmIx) -> &[usize] {
        &self.vm_groups[v]
    }

    /// How many running VMs of group `g` the host holds.
    pub fn group_count(&self, g: usize, h: HostIx) -> u32 {
        self.group_hosts[g].get(&h).copied().unwrap_or(0)
    }

    pub fn group_name(&self, g: usize) -> &str {
        self.group_ix
            .iter()
            .find(|(_, &i)| i == g)
            .map_or("?", |(n, _)| n.as_str())
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.get(name)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }

    /// The VM now runs on `to` (a migration committed, or it restarted
    /// there).
    pub fn move_vm(&mut self, v: VmIx, to: HostIx) {
        self.unplace(v);
        self.vms[v].state = VmRunState::Running;
        self.place(v, to);
    }

    /// The VM was terminated and not restarted: it holds nothing.
    pub fn stop_vm(&mut self, v: VmIx) {
        self.unplace(v);
        self.vms[v].state = VmRunState::Stopped;
    }

    pub fn set_health(&mut self, h: HostIx, health: Health) {
        self.hosts[h].health = health;
    }

    pub fn set_maintenance(&mut self, h: HostIx, m: Maintenance) {
        self.hosts[h].maintenance = m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Availability, MigrationPolicy, Version, GIB};

    pub(crate) fn host(name: &str) -> Host {
        Host {
            name: name.into(),
            capacity: Resources::new(16 * GIB, 16),
            labels: [("rack".to_string(), "r1".to_string())].into(),
            health: Health::Healthy,
            version: Version::new(1, 0),
            cpu_features: ["sse4_2".to_string()].into(),
            maintenance: Maintenance::None,
            link_bytes_per_sec: 1 << 30,
            receive_setup: None,
            send_setup_ms: None,
        }
    }

    pub(crate) fn vm(id: &str, host: &str) -> Vm {
        Vm {
            id: id.into(),
            tenant: "t".into(),
            host: host.into(),
            resources: Resources::new(GIB, 1),
            populated_bytes: GIB / 2,
            dirty_rate: 0,
            availability: Availability::default(),
            migration: MigrationPolicy::default(),
            anti_affinity: ["db".to_string()].into(),
            cpu_features: ["sse4_2".to_string()].into(),
            state: VmRunState::Running,
        }
    }

    #[test]
    fn moves_keep_the_indexes_right() {
        let mut f = Fleet::new(
            vec![host("a"), host("b")],
            vec![vm("v1", "a"), vm("v2", "a")],
            vec![],
        )
        .unwrap();
        let (a, b) = (f.host_ix("a").unwrap(), f.host_ix("b").unwrap());
        assert_eq!(f.used(a).mem_bytes, 2 * GIB);
        assert_eq!(f.group_count(0, a), 2);
        f.move_vm(f.vm_ix("v1").unwrap(), b);
        assert_eq!(f.used(a).mem_bytes, GIB);
        assert_eq!(f.used(b).mem_bytes, GIB);
        assert_eq!(f.group_count(0, b), 1);
        assert_eq!(f.vm(0).host, "b");
        f.stop_vm(1);
        assert_eq!(f.used(a).mem_bytes, 0);
        assert_eq!(f.vms_on(a).count(), 0);
        assert_eq!(f.vm_features(0), f.host_features(a));
    }

    #[test]
    fn bad_records_are_refused() {
        assert_eq!(
            Fleet::new(vec![host("a"), host("a")], vec![], vec![]).unwrap_err(),
            FleetError::DuplicateHost("a".into())
        );
        assert!(matches!(
            Fleet::new(vec![host("a")], vec![vm("v", "zz")], vec![]).unwrap_err(),
            FleetError::VmOnUnknownHost { .. }
        ));
    }
}
