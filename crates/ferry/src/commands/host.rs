//! `ferry host drain HOST [--dry-run] [--cancel]`: the operator's drain,
//! written to the fleet's store as a plan. The plan is prepared by the
//! fleet's own planner and dry run (each VM's action, target, predicted
//! duration, the predicted finish); `--dry-run` stores it as a draft and
//! starts nothing; without it the plan is stored running, and the serving
//! leader (`ferry fleet serve`), which watches the store, picks it up and
//! carries it out. `--cancel` stops the host's running drain: migrations
//! in flight go back to their sources, and the leader picks that up too.
//!
//! Writes are compare-and-swapped against the revisions read, so a write
//! racing the leader is refused rather than overwriting it, and retried
//! on what the store holds then.

use anyhow::Context;
use ferry_agent::fleet_migrator::AgentMigrator;
use ferry_fleet::plan::{Plan, PlanState};
use ferry_fleet::scheduler::{Scheduler, SchedulerError};
use ferry_fleet::store::StoreError;
use ferry_fleet::time::Timestamp;

use super::fleet_plans::plan_table;
use super::fleet_store_args::{AnyStore, StoreArgs};

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    #[command(subcommand)]
    pub command: HostCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Move every VM off HOST (or every host of a rack) under the fleet's
    /// policies: a plan the serving leader carries out.
    Drain(DrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// A host, or a rack (every host whose `rack` label it is).
    pub host: String,
    /// Store the plan as a draft and print it; start nothing.
    #[arg(long, conflicts_with = "cancel")]
    pub dry_run: bool,
    /// Cancel the host's running drain.
    #[arg(long)]
    pub cancel: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The plan as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Tries of a write that races the leader.
const WRITE_TRIES: u32 = 5;

type Sched = Scheduler<AnyStore, AgentMigrator<AnyStore>>;

fn open(backend: &AnyStore) -> anyhow::Result<Sched> {
    Scheduler::open(backend.clone(), AgentMigrator::new(backend.clone()), None)
        .context("load the fleet from its store")
}

/// Runs `f` on a freshly loaded scheduler, again (bounded) when its write
/// was refused because another writer changed the fleet meanwhile; the
/// scheduler's lease ends either way.
fn with_scheduler<T>(
    backend: &AnyStore,
    mut f: impl FnMut(&mut Sched) -> Result<T, SchedulerError>,
) -> anyhow::Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut s = open(backend)?;
        let r = f(&mut s);
        s.step_down().context("end the command's store lease")?;
        match r {
            Err(SchedulerError::Store(StoreError::Conflict { .. })) if tries < WRITE_TRIES => {
                std::thread::sleep(std::time::Duration::from_millis(100 * u64::from(tries)));
            }
            r => return Ok(r?),
        }
    }
}

fn print_plan(p: &Plan, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(p)?);
    } else {
        print!("{}", plan_table(p));
    }
    Ok(())
}

pub fn host(a: HostArgs) -> anyhow::Result<bool> {
    match a.command {
        HostCommand::Drain(d) => drain_cmd(d),
    }
}

fn drain_cmd(a: DrainArgs) -> anyhow::Result<bool> {
    let backend = a.store.open()?;
    if a.cancel {
        return cancel_cmd(&backend, &a);
    }
    // Prepared once: a refused write of a new plan cannot race (its keys
    // are new), so no retry can store it twice.
    let mut s = open(&backend)?;
    let prepared = s.prepare_drain(&a.host, Timestamp::now_wall()).cloned();
    s.step_down().context("end the command's store lease")?;
    let plan = prepared.with_context(|| format!("drain {}", a.host))?;
    if plan.state == PlanState::Refused || a.dry_run {
        print_plan(&plan, a.json)?;
        if plan.state == PlanState::Refused {
            let blocked = plan.blocked().count();
            anyhow::bail!(
                "the drain of {} does not start: {blocked} of {} VMs cannot move (see their reasons above); plan {} is stored refused",
                a.host,
                plan.entries.len(),
                plan.id
            );
        }
        eprintln!(
            "dry run: plan {} stored as a draft; nothing started",
            plan.id
        );
        return Ok(true);
    }
    let id = plan.id.clone();
    let running = with_scheduler(&backend, |s| {
        s.execute(&id, Timestamp::now_wall())?;
        Ok(s.plan(&id).cloned().expect("just executed"))
    })
    .with_context(|| format!("start plan {id}"))?;
    print_plan(&running, a.json)?;
    eprintln!(
        "plan {id} is running; the serving leader carries it out (`ferry fleet plan show {id}`)"
    );
    Ok(true)
}

fn cancel_cmd(backend: &AnyStore, a: &DrainArgs) -> anyhow::Result<bool> {
    let cancelled = with_scheduler(backend, |s| {
        let Some(id) = s
            .plans()
            .iter()
            .find(|p| p.state == PlanState::Running && p.kind.hosts().contains(&a.host))
            .map(|p| p.id.clone())
        else {
            return Ok(None);
        };
        s.cancel(&id, Timestamp::now_wall())?;
        Ok(s.plan(&id).cloned())
    })?;
    let Some(plan) = cancelled else {
        anyhow::bail!("no running drain of {} to cancel", a.host);
    };
    print_plan(&plan, a.json)?;
    eprintln!("plan {} cancelled; what already moved stays moved", plan.id);
    Ok(true)
}
