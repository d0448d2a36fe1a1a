//! ferryd as a member of a fleet (`[fleet]` in host.toml): it registers
//! its host record (name, capacity, labels, version) under a lease it
//! keeps alive, writes how the fleet reaches it (its API socket and peer
//! address), and keeps the fleet's records of the VMs it runs in step.
//!
//! What the agent writes of a VM is only what it alone knows: that the VM
//! runs here (a new VM, or one that arrived by migration), its resources
//! and its definition. The rest of the record (tenant, availability) is
//! the fleet's, and the agent never rewrites a record that already says
//! the VM runs here. Each write checks the revision it read, so a
//! concurrent write by the scheduler is never lost: one of the two is
//! refused and decides again from what the other wrote.
//!
//! Beside those, the agent writes what it measured for the fleet's
//! predictions (crate::fleet_figures): each VM's populated memory and
//! write rate, refreshed when they change by more than a fifth, and the
//! host's cost of receiving a VM, refreshed after each incoming migration.
//!
//! The store calls block (etcd's client, redb's file), so the member runs
//! on a thread of its own, beside the agent's runtime.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_fleet::agents::{put_definition, put_endpoint, AgentEndpoint};
use ferry_fleet::hosts::{self, Registration};
use ferry_fleet::model::{
    Availability, Health, Host, Maintenance, MigrationPolicy, Resources, Version, Vm, VmRunState,
};
use ferry_fleet::store::etcd::{EtcdBackend, DEFAULT_PREFIX};
use ferry_fleet::store::fleet_store::Batch;
use ferry_fleet::store::shared_file::SharedFileBackend;
use ferry_fleet::store::{Backend, Expect, FleetStore, StoreError};
use serde::Deserialize;

use crate::fleet_figures::{self, DirtyMeter};
use crate::model::{VmRecord, VmState};
use crate::server::Agent;

/// A store shared by the member's thread and whoever opened it.
pub type FleetBackend = Arc<dyn Backend + Send + Sync>;

/// `[fleet]`: which store, and what the host says of itself there.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetMembership {
    /// The embedded store: one file every process of a one-machine fleet
    /// opens (the agents and `ferry fleet serve`).
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// etcd's client URL, for a fleet across machines.
    #[serde(default)]
    pub etcd: Option<String>,
    /// The key prefix the fleet lives under in etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// rack, zone and any others the fleet's anti-affinity reads.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host is unreachable this long after its agent last spoke.
    #[serde(default = "default_ttl")]
    pub lease_ttl_s: u64,
    /// The migration link, Gbit/s (the fleet predicts durations from it).
    #[serde(default = "default_link")]
    pub link_gbit: f64,
    /// The tenant a VM created here belongs to until the fleet says.
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_string()
}
fn default_ttl() -> u64 {
    10
}
fn default_link() -> f64 {
    10.0
}
fn default_tenant() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("give exactly one of store (a file) and etcd (a URL)")]
    OneStore,
    #[error("store {0}: must be an absolute path")]
    RelativeStore(PathBuf),
    #[error("lease_ttl_s {0}: must be 1 to 3600")]
    Ttl(u64),
    #[error("link_gbit {0}: must be above 0")]
    Link(f64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the agent's records: {0}")]
    Records(String),
}

impl FleetMembership {
    pub fn check(&self) -> Result<(), MemberError> {
        match (&self.store, &self.etcd) {
            (Some(p), None) if !p.is_absolute() => Err(MemberError::RelativeStore(p.clone())),
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(MemberError::OneStore),
        }?;
        if !(1..=3600).contains(&self.lease_ttl_s) {
            return Err(MemberError::Ttl(self.lease_ttl_s));
        }
        if !(self.link_gbit.is_finite() && self.link_gbit > 0.0) {
            return Err(MemberError::Link(self.link_gbit));
        }
        Ok(())
    }

    /// Opens the store the way `ferry fleet serve` does.
    pub fn open_store(&self) -> Result<FleetBackend, MemberError> {
        match (&self.store, &self.etcd) {
            (Some(path), None) => Ok(Arc::new(SharedFileBackend::open(path)?)),
            (None, Some(url)) => Ok(Arc::new(EtcdBackend::connect(url, &self.prefix)?)),
            _ => Err(MemberError::OneStore),
        }
    }
}

/// This build's version as the fleet compares them (major.minor).
pub fn this_version() -> Version {
    let mut parts = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().unwrap_or(0));
    Version::new(parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The host record this agent registers.
pub fn host_record(agent: &Agent, m: &FleetMembership) -> Host {
    let c = agent.config.capacity;
    Host {
        name: agent.config.host_name.clone(),
        capacity: Resources::new(c.mem_bytes, c.vcpus),
        labels: m.labels.clone(),
        health: Health::Healthy,
        version: this_version(),
        cpu_features: Default::default(),
        maintenance: Maintenance::None,
        link_bytes_per_sec: link_bytes_per_sec(m),
        receive_setup: Some(fleet_figures::receive_setup(
            &crate::incoming::load(&agent.config.state_dir),
            link_bytes_per_sec(m),
        )),
        send_setup_ms: Some(fleet_figures::send_setup_ms(&crate::jobs::load(
            &agent.config.state_dir,
        ))),
    }
}

fn link_bytes_per_sec(m: &FleetMembership) -> u64 {
    (m.link_gbit * 1e9 / 8.0) as u64
}

/// What was measured of a VM just now (crate::fleet_figures).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measured {
    populated_bytes: u64,
    dirty_rate: u64,
}

fn measure(r: &VmRecord, meter: &mut DirtyMeter) -> Measured {
    let mem = r.definition.mem_bytes;
    Measured {
        // Not measurable: a first pass sends at most all of it.
        populated_bytes: r
            .pid
            .and_then(fleet_figures::populated_bytes)
            .map_or(mem, |p| p.min(mem)),
        dirty_rate: meter.sample(&r.id, &r.api_socket).unwrap_or(0),
    }
}

/// True when a stored figure is off from the measured one by more than a
/// fifth (and more than a MiB, or a MiB/s): worth a write to the store.
fn stale(stored: u64, measured: u64) -> bool {
    let d = stored.abs_diff(measured);
    d > 1 << 20 && d > stored.max(measured) / 5
}

/// True while an outgoing migration of `vm` runs.
fn migrating(agent: &Agent, vm: &str) -> bool {
    let slot = crate::server::lock(&agent.slots).get(vm).cloned();
    slot.is_some_and(|s| crate::server::lock(&s.job).is_some())
}

fn fleet_vm(r: &VmRecord, host: &str, tenant: &str, measured: Measured) -> Vm {
    let d = &r.definition;
    Vm {
        id: r.id.clone(),
        tenant: tenant.to_string(),
        host: host.to_string(),
        resources: Resources::new(d.mem_bytes, d.vcpus),
        populated_bytes: measured.populated_bytes,
        dirty_rate: measured.dirty_rate,
        availability: Availability::default(),
        migration: MigrationPolicy {
            allow_postcopy: r.policy.allow_postcopy,
        },
        anti_affinity: Default::default(),
        cpu_features: Default::default(),
        state: VmRunState::Running,
    }
}

/// A VM that arrived here by migration is written down by the scheduler
/// that moved it, at its commit; the agent writes it only if nobody did
/// this long after it first saw it here (the scheduler died meanwhile, or
/// an operator moved it). Writing at once only lost the race to the
/// scheduler's write, or won it and cost the scheduler a reload of the
/// whole fleet (a second or more with a busy store).
pub const ARRIVAL_GRACE: Duration = Duration::from_secs(5);

/// A VM's figures are rewritten at most this often (after its first
/// measured rate): each write makes the scheduler's copy of the record
/// stale, and its next write of it (the VM's next move) reloads the fleet.
pub const FIGURES_EVERY: Duration = Duration::from_secs(30);

/// What the member keeps between its rounds.
#[derive(Debug, Default)]
pub struct SyncState {
    pub meter: DirtyMeter,
    /// When each VM's figures were last rewritten here.
    figures_at: HashMap<String, Instant>,
    /// VMs seen running here while the fleet had them elsewhere, since.
    arrived: HashMap<String, Instant>,
}

/// Writes what changed of this host's VMs since the fleet last heard:
/// returns how many records it wrote.
pub fn sync_vms(
    agent: &Agent,
    m: &FleetMembership,
    backend: &FleetBackend,
    reg: &Registration,
    state: &mut SyncState,
) -> Result<usize, MemberError> {
    let me = &agent.config.host_name;
    let records = agent
        .list()
        .map_err(|e| MemberError::Records(e.to_string()))?;
    let store = FleetStore::new(backend);
    let stored: HashMap<String, _> = store
        .vms()?
        .into_iter()
        .map(|v| (v.value.id.clone(), v))
        .collect();
    let mut batch = Batch::default();
    let mut n = 0;
    // Only a running VM is surely here: a received VM is recorded at
    // its commit, and a VM leaving is running here until then.
    let running: Vec<&VmRecord> = records
        .iter()
        .filter(|r| r.state == VmState::Running)
        .collect();
    let here: Vec<&str> = running.iter().map(|r| r.id.as_str()).collect();
    state.meter.keep(&here);
    state.arrived.retain(|vm, _| here.contains(&vm.as_str()));
    state.figures_at.retain(|vm, _| here.contains(&vm.as_str()));
    let meter = &mut state.meter;
    for r in running {
        // A VM migrating out is left alone until it ends: its VMM is busy
        // sending, and the scheduler writes its record at the commit (a
        // write of ours in between costs the scheduler a reload).
        if migrating(agent, &r.id) && stored.contains_key(&r.id) {
            continue;
        }
        let measured = measure(r, meter);
        let vm = match stored.get(&r.id) {
            None => {
                batch.vm(&fleet_vm(r, me, &m.tenant, measured), Expect::Absent)?;
                true
            }
            Some(v) if v.value.host != *me || !v.value.is_running() => {
                let since = *state
                    .arrived
                    .entry(r.id.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() < ARRIVAL_GRACE {
                    continue;
                }
                let mut vm = v.value.clone();
                vm.host = me.clone();
                vm.state = VmRunState::Running;
                vm.populated_bytes = measured.populated_bytes;
                vm.dirty_rate = measured.dirty_rate;
                batch.vm(&vm, Expect::At(v.revision))?;
                true
            }
            // A first rate at once; then at most every FIGURES_EVERY.
            Some(v)
                if (v.value.dirty_rate == 0
                    || state
                        .figures_at
                        .get(&r.id)
                        .is_none_or(|t| t.elapsed() >= FIGURES_EVERY))
                    && (stale(v.value.populated_bytes, measured.populated_bytes)
                        || stale(v.value.dirty_rate, measured.dirty_rate)) =>
            {
                state.figures_at.insert(r.id.clone(), Instant::now());
                let mut vm = v.value.clone();
                vm.populated_bytes = measured.populated_bytes;
                vm.dirty_rate = measured.dirty_rate;
                batch.vm(&vm, Expect::At(v.revision))?;
                n += 1;
                false
            }
            Some(_) => false,
        };
        if vm {
            let def = serde_json::to_value(&r.definition)
                .map_err(|e| MemberError::Records(e.to_string()))?;
            put_definition(&mut batch, &r.id, &def)?;
            n += 1;
        }
    }
    if !batch.is_empty() {
        store.commit(batch, Some(reg.lease))?;
    }
    Ok(n)
}

/// Registers the host and writes its endpoint, under one lease.
pub fn register(
    agent: &Agent,
    m: &FleetMembership,
    backend: &FleetBackend,
) -> Result<Registration, MemberError> {
    let reg = hosts::register(backend, &host_record(agent, m), m.lease_ttl_s * 1000)?;
    let peer_address = std::fs::read_to_string(agent.config.state_dir.join("peer.addr"))
        .ok()
        .map(|a| a.trim().to_string());
    let mut batch = Batch::default();
    put_endpoint(
        &mut batch,
        &AgentEndpoint {
            host: agent.config.host_name.clone(),
            socket: std::path::absolute(&agent.config.socket)
                .unwrap_or_else(|_| agent.config.socket.clone()),
            peer_address,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        },
    )?;
    FleetStore::new(backend).commit(batch, Some(reg.lease))?;
    Ok(reg)
}

/// The member's thread; dropping it ends the registration (the host is
/// unreachable at once, rather than a TTL later).
pub struct Member {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the member when the config has a `[fleet]` table.
pub fn spawn(agent: &Arc<Agent>) -> Option<Member> {
    let m = agent.config.fleet.clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (agent, flag) = (agent.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("fleet-member".into())
        .spawn(move || run(&agent, &m, &flag))
        .map_err(|e| tracing::error!("cannot start the fleet member: {e}"))
        .ok()?;
    Some(Member {
        stop,
        thread: Some(thread),
    })
}

/// Sleeps up to `d`, waking early on `stop`; false once stopped.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
    !stop.load(Ordering::SeqCst)
}

fn run(agent: &Agent, m: &FleetMembership, stop: &AtomicBool) {
    let every = Duration::from_millis((m.lease_ttl_s * 1000 / 3).max(100));
    let host = &agent.config.host_name;
    let backend = loop {
        match m.open_store() {
            Ok(b) => break b,
            Err(e) => tracing::warn!("fleet: cannot open the store: {e}; trying again"),
        }
        if !nap(stop, every) {
            return;
        }
    };
    let mut reg: Option<Registration> = None;
    let mut state = SyncState::default();
    // The cost of receiving a VM last written (register writes it too).
    let mut setup_written = None;
    loop {
        match &reg {
            None => match register(agent, m, &backend) {
                Ok(r) => {
                    tracing::info!("fleet: {host} registered under lease {}", r.lease.0);
                    reg = Some(r);
                    setup_written = None;
                }
                Err(e) => tracing::warn!("fleet: cannot register {host}: {e}; trying again"),
            },
            Some(r) => match hosts::keep_alive(&backend, r) {
                Ok(()) => {}
                Err(StoreError::Fenced(_)) => {
                    tracing::warn!("fleet: {host}'s lease lapsed; registering again");
                    reg = None;
                    continue;
                }
                Err(e) => tracing::warn!("fleet: cannot keep {host}'s lease alive: {e}"),
            },
        }
        if let Some(r) = &reg {
            let me = host_record(agent, m);
            let costs = (me.receive_setup, me.send_setup_ms);
            if setup_written != Some(costs) {
                match hosts::update_own(&backend, &me, r) {
                    // Being drained: the scheduler's record until it ends.
                    Ok(false) => {}
                    Ok(true) => {
                        if let Some(s) = me.receive_setup {
                            tracing::info!(
                                "fleet: {host} receives a VM in {:.0} ms + {:.0} ms/GiB besides its pages ({} measured), sends one in {:.0} ms besides the receiver's part",
                                s.fixed_ms,
                                s.per_gib_ms,
                                s.samples,
                                me.send_setup_ms.unwrap_or_default()
                            );
                        }
                        setup_written = Some(costs);
                    }
                    // The scheduler wrote the record first: again next round.
                    Err(e) => tracing::info!("fleet: {host}'s record not refreshed: {e}"),
                }
            }
            match sync_vms(agent, m, &backend, r, &mut state) {
                Ok(0) => {}
                Ok(n) => tracing::info!("fleet: wrote {n} VM records of {host}"),
                // The scheduler wrote first: read again next round.
                Err(e) => tracing::info!("fleet: VM records of {host} not written: {e}"),
            }
        }
        if !nap(stop, every) {
            break;
        }
    }
    if let Some(r) = reg {
        match hosts::deregister(&backend, &r) {
            Ok(()) => tracing::info!("fleet: {host} deregistered"),
            Err(e) => tracing::warn!("fleet: cannot deregister {host}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(fleet: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(
            Path::new("h.toml"),
            &format!(
                "host_name = \"a\"\nstate_dir = \"/tmp/s\"\nferry_bin = \"/x\"\n[capacity]\nmemory = \"1G\"\nvcpus = 1\n[fleet]\n{fleet}"
            ),
        )
    }

    #[test]
    fn figures_are_rewritten_only_when_off_by_more_than_a_fifth() {
        const MIB: u64 = 1 << 20;
        assert!(!super::stale(50 * MIB, 45 * MIB), "10% off");
        assert!(super::stale(50 * MIB, 30 * MIB), "40% off");
        assert!(super::stale(0, 40 * MIB), "a first rate");
        assert!(!super::stale(0, MIB / 2), "under a MiB is noise");
    }

    #[test]
    fn a_fleet_table_names_one_store_and_sane_values() {
        let c = parse("store = \"/tmp/f.redb\"\nlabels = { rack = \"r1\" }\n").unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.labels["rack"], "r1");
        assert_eq!((f.lease_ttl_s, f.tenant.as_str()), (10, "default"));
        assert!(parse("etcd = \"http://127.0.0.1:2379\"\n").is_ok());
        for (bad, says) in [
            ("", "exactly one of store"),
            (
                "store = \"/f\"\netcd = \"http://x:1\"\n",
                "exactly one of store",
            ),
            ("store = \"f.redb\"\n", "absolute path"),
            ("store = \"/f\"\nlease_ttl_s = 0\n", "lease_ttl_s 0"),
            ("store = \"/f\"\nlink_gbit = -1.0\n", "link_gbit -1"),
            ("store = \"/f\"\nstorre = 1\n", "unknown field"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
