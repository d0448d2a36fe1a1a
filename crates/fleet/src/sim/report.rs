//! What a simulation found, as a table for people and JSON for programs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::audit::{Audit, Peak};
use super::migrator::LinkPeaks;
use super::SimConfig;
use crate::model::Host;
use crate::plan::{Plan, PlanState};
use crate::policy::Policies;
use crate::scheduler::DecisionStats;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Migrations {
    pub started: usize,
    pub committed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub retried_vms: usize,
    pub gave_up: usize,
    pub terminated: usize,
    pub restarted: usize,
    /// VMs committed more than once (must be 0).
    pub moved_twice: usize,
    pub gib_sent: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Decisions {
    /// Planner calls.
    pub rounds: usize,
    /// VM decisions over all calls.
    pub vm_decisions: u64,
    /// Most VMs waiting in one call.
    pub max_work: usize,
    pub round_median_us: f64,
    pub round_p99_us: f64,
    pub round_max_us: f64,
    /// Mean per VM decision.
    pub per_vm_decision_us: f64,
}

impl Decisions {
    pub fn from_stats(s: &DecisionStats) -> Self {
        let mut ns = s.round_ns.clone();
        ns.sort_unstable();
        let at = |q: f64| {
            if ns.is_empty() {
                0.0
            } else {
                ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
            }
        };
        let total: u64 = ns.iter().sum();
        Self {
            rounds: ns.len(),
            vm_decisions: s.vm_decisions,
            max_work: s.max_work,
            round_median_us: at(0.5),
            round_p99_us: at(0.99),
            round_max_us: at(1.0),
            per_vm_decision_us: if s.vm_decisions == 0 {
                0.0
            } else {
                total as f64 / 1e3 / s.vm_decisions as f64
            },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Links {
    pub host_link_gbit: f64,
    pub busiest_host_gbit: f64,
    pub busiest_host: String,
    /// Cross-rack traffic through the busiest rack uplink.
    pub busiest_rack_uplink_gbit: f64,
    pub busiest_rack: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SimReport {
    pub hosts: usize,
    pub vms: usize,
    pub drain: String,
    pub drained_hosts: usize,
    pub plan: String,
    pub plan_state: String,
    pub entries: usize,
    pub predicted_drain_ms: Option<u64>,
    pub drain_ms: u64,
    pub finished: bool,
    pub ticks: u64,
    pub entries_by_state: BTreeMap<String, usize>,
    /// VMs that cannot move, and why (a refused plan).
    pub blocked: Vec<(String, String)>,
    /// Entries left waiting, and why (first ten).
    pub unfinished: Vec<(String, String)>,
    pub migrations: Migrations,
    pub audit: Audit,
    pub links: Links,
    pub decisions: Decisions,
    pub dry_run_wall_ms: f64,
    pub sim_wall_ms: f64,
    pub policies: Policies,
}

fn gbit(bytes_per_sec: f64) -> f64 {
    bytes_per_sec * 8.0 / 1e9
}

impl SimReport {
    pub fn new(cfg: &SimConfig, hosts: &[Host], vms: usize, plan: &Plan) -> Self {
        Self {
            hosts: hosts.len(),
            vms,
            drain: cfg.drain.clone(),
            drained_hosts: plan.kind.hosts().len(),
            plan: plan.id.clone(),
            plan_state: format!("{:?}", plan.state).to_lowercase(),
            entries: plan.entries.len(),
            predicted_drain_ms: plan.predicted_duration_ms,
            blocked: plan
                .blocked()
                .map(|e| (e.vm.clone(), e.reason.clone().unwrap_or_default()))
                .collect(),
            policies: cfg.policies.clone(),
            finished: plan.state != PlanState::Refused,
            ..Self::default()
        }
    }

    pub fn set_links(&mut self, p: &LinkPeaks, link: u64) {
        let (rack, up) = p
            .rack_uplink
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or((String::new(), 0.0), |(r, v)| (r.clone(), *v));
        self.links = Links {
            host_link_gbit: gbit(link as f64),
            busiest_host_gbit: gbit(p.host),
            busiest_host: p.host_name.clone(),
            busiest_rack_uplink_gbit: gbit(up),
            busiest_rack: rack,
        };
    }

    /// True when no cap or pacing limit was exceeded and no VM moved twice.
    pub fn clean(&self) -> bool {
        self.audit.violations.is_empty() && self.migrations.moved_twice == 0
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("{k:<28} {v}\n"));
        row(
            "fleet",
            format!(
                "{} hosts, {} VMs; drain {} ({} hosts, {} VMs), plan {}",
                self.hosts, self.vms, self.drain, self.drained_hosts, self.entries, self.plan
            ),
        );
        let c = &self.policies.caps;
        let p = &self.policies.pacing;
        row(
            "policies",
            format!(
                "out {} / in {} per host, {} per tenant, {} fleet-wide; headroom {}%; pace {}/{} s per rack, {}/{} s fleet; {} attempts",
                c.host_outbound,
                c.host_inbound,
                c.per_tenant,
                c.fleet,
                self.policies.headroom_percent,
                p.per_rack.max_starts,
                p.per_rack.interval_ms as f64 / 1e3,
                p.fleet.max_starts,
                p.fleet.interval_ms as f64 / 1e3,
                self.policies.retries.max_attempts
            ),
        );
        if !self.blocked.is_empty() {
            row(
                "plan",
                format!(
                    "REFUSED: {} VMs cannot move; nothing started",
                    self.blocked.len()
                ),
            );
            for (vm, why) in self.blocked.iter().take(10) {
                row("", format!("{vm}: {why}"));
            }
            return out;
        }
        row(
            "drain time",
            format!(
                "{:.1} s simulated (dry run predicted {}){}",
                self.drain_ms as f64 / 1e3,
                self.predicted_drain_ms
                    .map_or("-".into(), |p| format!("{:.1} s", p as f64 / 1e3)),
                if self.finished { "" } else { "; NOT FINISHED" }
            ),
        );
        let m = &self.migrations;
        row(
            "migrations",
            format!(
                "{} started, {} committed, {} failed, {} cancelled; {} VMs retried, {} given up; {:.0} GiB sent",
                m.started, m.committed, m.failed, m.cancelled, m.retried_vms, m.gave_up, m.gib_sent
            ),
        );
        row(
            "terminations",
            format!(
                "{} terminated per policy, {} restarted on another host",
                m.terminated, m.restarted
            ),
        );
        row(
            "entries",
            self.entries_by_state
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let peak = |p: &Peak| match p.cap {
            Some(c) => format!("{} of {} ({})", p.peak, c, p.at),
            None => format!("{} ({})", p.peak, p.at),
        };
        let a = &self.audit;
        row("peak concurrent, fleet", peak(&a.fleet));
        row("peak outbound per host", peak(&a.host_outbound));
        row("peak inbound per host", peak(&a.host_inbound));
        row("peak per tenant", peak(&a.tenant));
        row("peak leaving one rack", peak(&a.rack_outbound));
        row(
            "most starts per rack window",
            peak(&a.rack_starts_per_window),
        );
        row(
            "most starts per fleet window",
            peak(&a.fleet_starts_per_window),
        );
        let l = &self.links;
        row(
            "peak link load",
            format!(
                "host {:.1} of {:.0} Gbit/s ({}); rack uplink {:.1} Gbit/s cross-rack ({})",
                l.busiest_host_gbit,
                l.host_link_gbit,
                l.busiest_host,
                l.busiest_rack_uplink_gbit,
                l.busiest_rack
            ),
        );
        row(
            "caps exceeded",
            if a.violations.is_empty() {
                "never (checked against the migrator's record)".into()
            } else {
                format!("{}: {}", a.violations.len(), a.violations[0])
            },
        );
        row("VMs moved twice", m.moved_twice.to_string());
        let d = &self.decisions;
        row(
            "decisions",
            format!(
                "{} planner rounds, {} VM decisions (up to {} VMs per round)",
                d.rounds, d.vm_decisions, d.max_work
            ),
        );
        row(
            "time per round (measured)",
            format!(
                "median {:.0} us, p99 {:.0} us, max {:.0} us; {:.2} us per VM decision",
                d.round_median_us, d.round_p99_us, d.round_max_us, d.per_vm_decision_us
            ),
        );
        row(
            "wall time",
            format!(
                "dry run {:.0} ms, run {:.0} ms ({} ticks)",
                self.dry_run_wall_ms, self.sim_wall_ms, self.ticks
            ),
        );
        for (vm, why) in self.unfinished.iter().take(5) {
            row("still waiting", format!("{vm}: {why}"));
        }
        out
    }
}
