//! Small fleets for the scheduler's tests, and a loop that runs them on
//! the simulated clock.

#![allow(dead_code)]

pub mod etcd;

use ferry_fleet::model::{Availability, Host, OnHostMaintenance, Vm};
use ferry_fleet::policy::Policies;
use ferry_fleet::scheduler::Scheduler;
use ferry_fleet::sim::{run, RunLimits, RunOutcome, SimMigrator};
use ferry_fleet::store::memory::MemoryBackend;
use ferry_fleet::store::Backend;
use ferry_fleet::time::Timestamp;

// Not every test file uses both.
#[allow(unused_imports)]
pub use ferry_fleet::sim::fixtures::{host, vm};

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
    ferry_fleet::sim::open_simulated(backend, hosts, vms, &[], policies).unwrap()
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
