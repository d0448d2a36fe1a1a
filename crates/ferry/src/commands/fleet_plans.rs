//! `ferry fleet plans` and `ferry fleet plan show ID`: the plans in the
//! fleet's store, read as they stand (the serving leader writes every
//! step before it acts), each VM's state, target, prediction and reason.
//! Tables for people, `--json` for programs. The table of one plan is
//! also what `ferry host drain --dry-run` prints.

use std::fmt::Write as _;

use anyhow::Context;
use ferry_fleet::plan::{Action, EntryState, Plan, PlanKind};
use ferry_fleet::store::FleetStore;
use ferry_fleet::time::Timestamp;

use super::fleet_store_args::StoreArgs;

#[derive(Debug, clap::Args)]
pub struct PlansArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: PlanCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum PlanCommand {
    /// One plan: every VM's action, state, target, prediction and reason.
    Show {
        id: String,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
}

fn kind_words(k: &PlanKind) -> String {
    match k {
        PlanKind::Drain { hosts } => format!("drain {}", hosts.join(",")),
        PlanKind::Evacuate { hosts, .. } => format!("evacuate {}", hosts.join(",")),
        PlanKind::Move { vm, to } => format!("move {vm} to {}", to.as_deref().unwrap_or("any")),
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1e3)
}

/// A wall-clock time of day, UTC (the fleet's timestamps are UNIX ms).
fn time_of_day(t: Timestamp) -> String {
    let s = t.ms() / 1000 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// The plan as a table, one row per VM, and its predicted finish.
pub fn plan_table(p: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan {}: {}, {:?}, {} VMs",
        p.id,
        kind_words(&p.kind),
        p.state,
        p.entries.len()
    );
    let _ = writeln!(
        out,
        "{:<16} {:<20} {:<12} {:<16} {:>10} {:>10}  REASON",
        "VM", "ACTION", "STATE", "TARGET", "PREDICTED", "ENDS AT"
    );
    for e in &p.entries {
        let action = match e.action {
            Action::Migrate => "migrate".to_string(),
            Action::Terminate { restart: true } => "terminate+restart".to_string(),
            Action::Terminate { restart: false } => "terminate".to_string(),
        };
        let target = match &e.state {
            EntryState::Migrating { target, .. } | EntryState::Migrated { target, .. } => {
                Some(target.as_str())
            }
            _ => e.target.as_deref(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:<12} {:<16} {:>10} {:>10}  {}",
            e.vm,
            action,
            e.state.word(),
            target.unwrap_or("-"),
            seconds(e.predicted_ms),
            e.predicted_end_ms.map_or("-".into(), seconds),
            e.reason.as_deref().unwrap_or("")
        );
    }
    match p.predicted_duration_ms {
        Some(d) => {
            let from = p.started_at.unwrap_or(p.created_at);
            let _ = writeln!(
                out,
                "predicted drain time {}; predicted finish {} ({} from {})",
                seconds(d),
                time_of_day(from.plus_ms(d)),
                seconds(d),
                if p.started_at.is_some() {
                    "its start"
                } else {
                    "now, if it starts now"
                }
            );
        }
        None => {
            let _ = writeln!(out, "no prediction (the dry run could not carry it out)");
        }
    }
    out
}

fn load(store: &StoreArgs) -> anyhow::Result<Vec<Plan>> {
    let backend = store.open()?;
    Ok(FleetStore::new(backend)
        .plan_records()
        .context("read the plans")?
        .into_iter()
        .map(|s| s.plan)
        .collect())
}

pub fn plans_cmd(a: PlansArgs) -> anyhow::Result<bool> {
    let plans = load(&a.store)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plans)?);
        return Ok(true);
    }
    println!(
        "{:<32} {:<24} {:<10} {:>4}  ENTRIES",
        "PLAN", "KIND", "STATE", "VMS"
    );
    for p in &plans {
        let counts: Vec<String> = p.counts().iter().map(|(w, n)| format!("{n} {w}")).collect();
        println!(
            "{:<32} {:<24} {:<10} {:>4}  {}",
            p.id,
            kind_words(&p.kind),
            format!("{:?}", p.state),
            p.entries.len(),
            counts.join(", ")
        );
    }
    Ok(true)
}

pub fn plan_cmd(a: PlanArgs) -> anyhow::Result<bool> {
    let PlanCommand::Show { id, store, json } = a.command;
    let plans = load(&store)?;
    let Some(p) = plans.iter().find(|p| p.id == id) else {
        let ids: Vec<&str> = plans.iter().map(|p| p.id.as_str()).collect();
        anyhow::bail!(
            "no plan {id} in the store (plans: {})",
            if ids.is_empty() {
                "none".into()
            } else {
                ids.join(", ")
            }
        );
    };
    if json {
        println!("{}", serde_json::to_string_pretty(p)?);
    } else {
        print!("{}", plan_table(p));
    }
    Ok(true)
}
