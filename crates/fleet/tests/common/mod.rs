//! Small fleets for the scheduler's tests, and a loop that runs them on
//! the simulated clock.

#![allow(dead_code)]

pub mod etcd;

use ferry_fleet::model::{
    Availability, Health, Host, Maintenance, MigrationPolicy, OnHostMaintenance, Resources,
    Version, Vm, VmRunState, GIB,
};
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::Scheduler;
use ferry_fleet::sim::{run, RunLimits, RunOutcome, SimMigrator};
use ferry_fleet::store::memory::MemoryBackend;
use ferry_fleet::store::{Backend, FleetStore};
use ferry_fleet::time::Timestamp;

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
    }
}

pub fn vm(id: &str, tenant: &str, host: &str, mem_gib: u64) -> Vm {
    Vm {
        id: id.into(),
        tenant: tenant.into(),
        host: host.into(),
        resources: Resources::new(mem_gib * GIB, 1),
        // 1 GiB populated of an idle VM: ~0.9 s alone on 10 Gbit/s.
        populated_bytes: GIB,
        dirty_rate: 0,
        availability: Availability::default(),
        migration: MigrationPolicy::default(),
        anti_affinity: Default::default(),
        cpu_features: ["avx2".to_string()].into(),
        state: VmRunState::Running,
    }
}

pub fn terminate(mut v: Vm, restart: bool) -> Vm {
    v.availability = Availability {
        on_host_maintenance: OnHostMaintenance::Terminate,
        automatic_restart: restart,
    };
    v
}

/// Seeds the backend with the fleet and opens a scheduler on it with a
/// simulated migrator.
pub fn open_on<B: Backend>(
    backend: B,
    hosts: &[Host],
    vms: &[Vm],
    policies: &Policies,
) -> Scheduler<B, SimMigrator> {
    let store = FleetStore::new(backend);
    store.seed(hosts, vms, &[], policies).unwrap();
    Scheduler::open(store.into_backend(), SimMigrator::new(hosts, vms), None).unwrap()
}

pub fn open(
    hosts: &[Host],
    vms: &[Vm],
    policies: &Policies,
) -> Scheduler<MemoryBackend, SimMigrator> {
    open_on(MemoryBackend::new(), hosts, vms, policies)
}

pub fn run_all<B: Backend>(s: &mut Scheduler<B, SimMigrator>, from: Timestamp) -> RunOutcome {
    run(s, from, RunLimits::default(), |_, _| {}).unwrap()
}

/// Ticks until `until` (simulated ms) or every plan ended.
pub fn run_until<B: Backend>(
    s: &mut Scheduler<B, SimMigrator>,
    from: Timestamp,
    until: u64,
) -> RunOutcome {
    let limits = RunLimits {
        max_ms: until - from.ms(),
        ..RunLimits::default()
    };
    run(s, from, limits, |_, _| {}).unwrap()
}

pub fn tmp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-fleet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
