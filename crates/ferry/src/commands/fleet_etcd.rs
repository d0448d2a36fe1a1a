//! `ferry fleet serve` and `ferry fleet host register|list`: the fleet on
//! an etcd store (crates/fleet's etcd backend, leader election and host
//! leases), and `serve` also on the embedded store file of a one-machine
//! fleet (the file its ferryd register in), migrating on the agents.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_agent::fleet_jobs::AgentJobs;
use ferry_agent::fleet_migrator::AgentMigrator;
use ferry_fleet::hosts;
use ferry_fleet::migrator::Migrator;
use ferry_fleet::model::{Health, Host, Maintenance, Resources, Version, GIB};
use ferry_fleet::serve::{serve, ServeConfig, ServeEvent};
use ferry_fleet::sim::SimMigrator;
use ferry_fleet::store::shared_file::SharedFileBackend;
use ferry_fleet::store::{Backend, FleetStore, StoreError};
use ferry_fleet::web::{MigrationSource, NoMigrations, WebServer};

use super::fleet_store_args::{EtcdArgs, StoreArgs};

/// What carries out the scheduler's migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MigratorKind {
    /// The hosts' ferryd, through their APIs (the sockets they registered).
    Agents,
    /// The simulated migrator (durations from the figures measured here).
    Sim,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long, value_enum, default_value_t = MigratorKind::Agents)]
    pub migrator: MigratorKind,
    /// This scheduler's name (the leader key shows it).
    #[arg(long)]
    pub name: String,
    /// A dead leader's leadership lapses after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl_s: u64,
    #[arg(long, default_value_t = 500)]
    pub tick_ms: u64,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    pub for_s: Option<u64>,
    /// Serve the fleet's read-only web page (and /api/fleet) on ADDR,
    /// host:port; port 0 takes a free one (the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub web: Option<String>,
    /// Write the web page's bound address (host:port) to this file once it
    /// listens.
    #[arg(long, requires = "web")]
    pub web_addr_file: Option<std::path::PathBuf>,
}

/// `ferry fleet host ...`: the hosts of an etcd fleet (not `ferry host`,
/// the operator's drain in `host.rs`).
#[derive(Debug, clap::Args)]
pub struct FleetHostArgs {
    #[command(subcommand)]
    pub command: FleetHostCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetHostCommand {
    /// Register a host and keep its lease alive until SIGINT/SIGTERM (or
    /// --for-s); it is unreachable once the lease lapses.
    Register(RegisterArgs),
    /// Every host with its health and whether its lease is alive.
    List(EtcdArgs),
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub store: EtcdArgs,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub mem_gib: u64,
    #[arg(long)]
    pub vcpus: u32,
    #[arg(long, default_value = "")]
    pub rack: String,
    #[arg(long, default_value = "")]
    pub zone: String,
    /// The migration link, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    pub link_gbit: f64,
    #[arg(long, default_value_t = 10)]
    pub lease_ttl_s: u64,
    #[arg(long)]
    pub for_s: Option<u64>,
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone()).context("install a signal handler")?;
    }
    Ok(flag)
}

fn ttl_ms(s: u64) -> anyhow::Result<u64> {
    anyhow::ensure!(
        (1..=3600).contains(&s),
        "--lease-ttl-s must be 1 to 3600 seconds, got {s}"
    );
    Ok(s * 1000)
}

pub fn serve_cmd(a: ServeArgs) -> anyhow::Result<bool> {
    let cfg = ServeConfig {
        name: a.name.clone(),
        lease_ttl_ms: ttl_ms(a.lease_ttl_s)?,
        tick_ms: a.tick_ms,
        max_run: a.for_s.map(Duration::from_secs),
    };
    let stop = stop_flag()?;
    // Not `StoreArgs::open`: serve may be the first to open the store file
    // (which makes it), where the other commands refuse a missing one.
    match &a.store.store_file {
        Some(path) => {
            let backend = SharedFileBackend::open(path)
                .with_context(|| format!("the store file {}", path.display()))?;
            let _web = start_web(&a, backend.clone())?;
            serve_on(backend, &cfg, &stop, a.migrator)
        }
        None => {
            let backend = a.store.etcd.connect()?;
            let _web = start_web(&a, backend.clone())?;
            serve_on(backend, &cfg, &stop, a.migrator)
        }
    }
}

/// The web page, if `--web` asked for it; it serves until dropped.
fn start_web<B: Backend + Clone + Send + Sync + 'static>(
    a: &ServeArgs,
    backend: B,
) -> anyhow::Result<Option<WebServer>> {
    let Some(addr) = &a.web else {
        return Ok(None);
    };
    let migrations: Arc<dyn MigrationSource> = match a.migrator {
        MigratorKind::Agents => Arc::new(AgentJobs::new()),
        MigratorKind::Sim => Arc::new(NoMigrations),
    };
    let web = WebServer::start(addr, backend, migrations)?;
    eprintln!("{}: web page at http://{}/", a.name, web.addr);
    if let Some(f) = &a.web_addr_file {
        // Written whole under another name first: a reader never sees half.
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, web.addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, f))
            .with_context(|| format!("write the web address to {}", f.display()))?;
    }
    Ok(Some(web))
}

/// One migrator or the other, as the serve loop drives it.
enum AnyMigrator<B: Backend> {
    Agents(AgentMigrator<B>),
    Sim(Box<SimMigrator>),
}

impl<B: Backend> AnyMigrator<B> {
    fn inner(&mut self) -> &mut dyn Migrator {
        match self {
            Self::Agents(m) => m,
            Self::Sim(m) => m.as_mut(),
        }
    }
}

impl<B: Backend> Migrator for AnyMigrator<B> {
    fn start(
        &mut self,
        req: &ferry_fleet::migrator::MigrationRequest,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<(), ferry_fleet::migrator::MigratorError> {
        self.inner().start(req, now)
    }
    fn poll(
        &mut self,
        id: &str,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<ferry_fleet::migrator::MigrationStatus, ferry_fleet::migrator::MigratorError> {
        self.inner().poll(id, now)
    }
    fn cancel(
        &mut self,
        id: &str,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<(), ferry_fleet::migrator::MigratorError> {
        self.inner().cancel(id, now)
    }
    fn switch_to_postcopy(
        &mut self,
        id: &str,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<(), ferry_fleet::migrator::MigratorError> {
        self.inner().switch_to_postcopy(id, now)
    }
    fn terminate(
        &mut self,
        vm: &ferry_fleet::model::Vm,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<(), ferry_fleet::migrator::MigratorError> {
        self.inner().terminate(vm, now)
    }
    fn boot(
        &mut self,
        vm: &ferry_fleet::model::Vm,
        host: &str,
        now: ferry_fleet::time::Timestamp,
    ) -> Result<(), ferry_fleet::migrator::MigratorError> {
        self.inner().boot(vm, host, now)
    }
}

fn serve_on<B: Backend + Clone>(
    backend: B,
    cfg: &ServeConfig,
    stop: &AtomicBool,
    kind: MigratorKind,
) -> anyhow::Result<bool> {
    let name = cfg.name.clone();
    serve(
        backend,
        cfg,
        stop,
        |store: &FleetStore<B>| -> Result<AnyMigrator<B>, StoreError> {
            Ok(match kind {
                MigratorKind::Agents => {
                    AnyMigrator::Agents(AgentMigrator::new(store.backend().clone()))
                }
                MigratorKind::Sim => {
                    let hosts: Vec<_> = store.hosts()?.into_iter().map(|v| v.value).collect();
                    let vms: Vec<_> = store.vms()?.into_iter().map(|v| v.value).collect();
                    AnyMigrator::Sim(Box::new(SimMigrator::new(&hosts, &vms)))
                }
            })
        },
        |m, now| {
            if let AnyMigrator::Sim(s) = m {
                s.advance(now)
            }
        },
        |ev| match ev {
            ServeEvent::Following { leader } => eprintln!("{name}: following {leader}"),
            ServeEvent::Leading { revision } => {
                eprintln!("{name}: leading (claim at revision {revision})")
            }
            ServeEvent::Lost { why } => eprintln!("{name}: stopped leading: {why}"),
            ServeEvent::Reload { why } => eprintln!("{name}: reloading the fleet: {why}"),
            ServeEvent::HostsChanged(h) => eprintln!("{name}: host health changed: {h:?}"),
            ServeEvent::StoreError(e) => eprintln!("{name}: {e}"),
        },
    )?;
    Ok(true)
}

pub fn host_cmd(a: FleetHostArgs) -> anyhow::Result<bool> {
    match a.command {
        FleetHostCommand::Register(r) => register_cmd(r),
        FleetHostCommand::List(s) => list_cmd(&s),
    }
}

fn register_cmd(r: RegisterArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        r.mem_gib > 0 && r.vcpus > 0,
        "--mem-gib and --vcpus must be above 0"
    );
    anyhow::ensure!(
        r.link_gbit.is_finite() && r.link_gbit > 0.0,
        "--link-gbit must be above 0"
    );
    let ttl = ttl_ms(r.lease_ttl_s)?;
    let mut labels = std::collections::BTreeMap::new();
    for (k, v) in [("rack", &r.rack), ("zone", &r.zone)] {
        if !v.is_empty() {
            labels.insert(k.to_string(), v.clone());
        }
    }
    let host = Host {
        name: r.name.clone(),
        capacity: Resources::new(r.mem_gib * GIB, r.vcpus),
        labels,
        health: Health::Healthy,
        version: Version::new(1, 4),
        cpu_features: Default::default(),
        maintenance: Maintenance::None,
        link_bytes_per_sec: (r.link_gbit * 1e9 / 8.0) as u64,
        receive_setup: None,
        send_setup_ms: None,
    };
    let backend = r.store.connect()?;
    let reg = hosts::register(&backend, &host, ttl).context("register the host")?;
    eprintln!("{}: registered under lease {}", r.name, reg.lease.0);
    let stop = stop_flag()?;
    let started = Instant::now();
    let every = Duration::from_millis(ttl / 3);
    let mut kept = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && r.for_s
            .is_none_or(|s| started.elapsed() < Duration::from_secs(s))
    {
        if kept.elapsed() >= every {
            hosts::keep_alive(&backend, &reg).context("keep the host's lease alive")?;
            kept = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    hosts::deregister(&backend, &reg).context("end the registration")?;
    eprintln!("{}: deregistered", r.name);
    Ok(true)
}

fn list_cmd(s: &EtcdArgs) -> anyhow::Result<bool> {
    let backend = s.connect()?;
    println!(
        "{:<16} {:>8} {:>6} {:<10} {:<12} {:<8}",
        "HOST", "MEM GiB", "VCPUS", "RACK", "HEALTH", "LEASE"
    );
    for h in hosts::list(&backend)? {
        let lease = match h.alive {
            Some(true) => "alive",
            Some(false) => "lapsed",
            None => "-",
        };
        println!(
            "{:<16} {:>8} {:>6} {:<10} {:<12} {:<8}",
            h.host.name,
            h.host.capacity.mem_bytes / GIB,
            h.host.capacity.vcpus,
            h.host.labels.get("rack").map_or("-", String::as_str),
            h.host.health.word(),
            lease
        );
    }
    Ok(true)
}
