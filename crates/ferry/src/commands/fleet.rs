//! `ferry fleet simulate`: the fleet scheduler (crates/fleet) on a
//! generated fleet with the simulated migrator and clock. It prints the
//! drain's table (or `--json`), and a progress bar on stderr while it runs
//! when stderr is a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use ferry_fleet::model::{Resources, GIB};
use ferry_fleet::policy::Policies;
use ferry_fleet::sim::{simulate, FleetSpec, RunLimits, SimConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Drain a host or rack of a generated fleet with the real planner and
    /// a simulated migrator; report drain time, peaks against the caps and
    /// the planner's time per decision.
    Simulate(SimulateArgs),
    /// Run the fleet scheduler on an etcd store (or a one-machine fleet's
    /// store file): one `serve` of several leads (the others wait and take
    /// over when it dies); its writes are fenced by its leadership.
    /// Migrations run on the hosts' ferryd (or, --migrator sim, on the
    /// simulated migrator).
    Serve(super::fleet_etcd::ServeArgs),
    /// Hosts in an etcd store: register one under a lease, or list them.
    Host(super::fleet_etcd::FleetHostArgs),
    /// Every plan in the store (drains, evacuations, moves) and its
    /// entries' states.
    Plans(super::fleet_plans::PlansArgs),
    /// One plan: `plan show ID`.
    Plan(super::fleet_plans::PlanArgs),
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    #[arg(long, default_value_t = 20_000)]
    pub vms: usize,
    #[arg(long, default_value_t = 50)]
    pub tenants: usize,
    /// A host (h0007) or a rack (rack7) to drain.
    #[arg(long)]
    pub drain: String,
    /// Policy overrides: out=2,in=2,tenant=8,fleet=64,headroom=10,
    /// rack-pace=32/10s,fleet-pace=128/10s,attempts=3.
    #[arg(long, default_value = "")]
    pub caps: String,
    /// Memory per host, GiB.
    #[arg(long, default_value_t = 128)]
    pub host_mem_gib: u64,
    #[arg(long, default_value_t = 96)]
    pub host_vcpus: u32,
    /// Each host's migration link, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    pub link_gbit: f64,
    /// A host that fails mid-drain: HOST@SECONDS (may repeat).
    #[arg(long = "fail")]
    pub fail: Vec<String>,
    /// Keep the fleet in this redb file (a new one) instead of in memory.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Simulated milliseconds between scheduler ticks.
    #[arg(long, default_value_t = 50)]
    pub tick_ms: u64,
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

pub fn fleet(args: FleetArgs) -> anyhow::Result<bool> {
    match args.command {
        FleetCommand::Simulate(a) => simulate_cmd(a),
        FleetCommand::Serve(a) => super::fleet_etcd::serve_cmd(a),
        FleetCommand::Host(a) => super::fleet_etcd::host_cmd(a),
        FleetCommand::Plans(a) => super::fleet_plans::plans_cmd(a),
        FleetCommand::Plan(a) => super::fleet_plans::plan_cmd(a),
    }
}

fn parse_failure(s: &str) -> anyhow::Result<(String, u64)> {
    let (host, secs) = s
        .split_once('@')
        .with_context(|| format!("--fail {s}: expected HOST@SECONDS, e.g. h0042@30"))?;
    let secs: f64 = secs
        .trim_end_matches('s')
        .parse()
        .with_context(|| format!("--fail {s}: {secs} is not a number of seconds"))?;
    anyhow::ensure!(
        secs.is_finite() && secs >= 0.0,
        "--fail {s}: the time must be 0 s or later"
    );
    Ok((host.to_string(), (secs * 1e3) as u64))
}

fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(a.hosts > 0, "--hosts must be at least 1");
    anyhow::ensure!(a.tick_ms > 0, "--tick-ms must be at least 1");
    anyhow::ensure!(
        a.link_gbit.is_finite() && a.link_gbit > 0.0,
        "--link-gbit must be above 0"
    );
    let policies = Policies::default().with_overrides(&a.caps)?;
    let failures = a
        .fail
        .iter()
        .map(|s| parse_failure(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = SimConfig {
        spec: FleetSpec {
            hosts: a.hosts,
            vms: a.vms,
            tenants: a.tenants,
            host_capacity: Resources::new(a.host_mem_gib * GIB, a.host_vcpus),
            link_bytes_per_sec: (a.link_gbit * 1e9 / 8.0) as u64,
            headroom_percent: policies.headroom_percent,
            seed: a.seed,
            ..FleetSpec::default()
        },
        drain: a.drain.clone(),
        policies,
        limits: RunLimits {
            tick_ms: a.tick_ms,
            ..RunLimits::default()
        },
        store: a.store.clone(),
        failures,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} simulated {msg} [{bar:30}] {pos}/{len} VMs")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message("planning (dry run)");
        bar
    });
    let report = simulate(&cfg, &mut |p| {
        if let Some(bar) = &bar {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(format!(
                "{:.0} s, {} in flight",
                p.now_ms as f64 / 1e3,
                p.in_flight
            ));
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(report.blocked.is_empty() && report.finished && report.clean())
}
