//! Small fleets by hand: the hosts and VMs the planner's unit tests, the
//! scheduler's integration tests and examples build their fleets from,
//! and the one way to open a scheduler on a seeded store with the
//! simulated migrator (the simulator, the dry run and the tests all start
//! so).

use crate::model::{
    Availability, Health, Host, Maintenance, MigrationPolicy, Resources, Tenant, Version, Vm,
    VmRunState, GIB,
};
use crate::policy::Policies;
use crate::scheduler::{Scheduler, SchedulerError};
use crate::store::{Backend, FleetStore};

use super::SimMigrator;

/// A healthy host of `mem_gib` and 64 vCPUs in `rack` (zone z1), on
/// 10 Gbit/s, version 1.4, with avx2.
pub fn host(name: &str, rack: &str, mem_gib: u64) -> Host {
    Host {
        name: name.into(),
        capacity: Resources::new(mem_gib * GIB, 64),
        labels: [
            ("rack".to_string(), rack.to_string()),
            ("zone".to_string(), "z1".to_string()),
        ]
        .into(),
        health: Health::Healthy,
        version: Version::new(1, 4),
        cpu_features: ["avx2".to_string()].into(),
        maintenance: Maintenance::None,
        link_bytes_per_sec: 1_250_000_000,
        receive_setup: None,
        send_setup_ms: None,
    }
}

/// A running idle VM of `mem_gib` and 1 vCPU, 1 GiB populated (about
/// 0.9 s alone on 10 Gbit/s), with the default policies.
pub fn vm(id: &str, tenant: &str, host: &str, mem_gib: u64) -> Vm {
    Vm {
        id: id.into(),
        tenant: tenant.into(),
        host: host.into(),
        resources: Resources::new(mem_gib * GIB, 1),
        populated_bytes: GIB,
        dirty_rate: 0,
        availability: Availability::default(),
        migration: MigrationPolicy::default(),
        anti_affinity: Default::default(),
        cpu_features: ["avx2".to_string()].into(),
        state: VmRunState::Running,
    }
}

/// Seeds `backend` (it must be empty) with the fleet and `policies`, and
/// opens a scheduler on it that drives a simulated migrator of the same
/// fleet. Invalid policies are refused here, as by `Scheduler::open`.
pub fn open_simulated<B: Backend>(
    backend: B,
    hosts: &[Host],
    vms: &[Vm],
    tenants: &[Tenant],
    policies: &Policies,
) -> Result<Scheduler<B, SimMigrator>, SchedulerError> {
    let store = FleetStore::new(backend);
    store.seed(hosts, vms, tenants, policies)?;
    Scheduler::open(
        store.into_backend(),
        SimMigrator::new(hosts, vms),
        Some(policies.clone()),
    )
}
