//! Preparing a plan: one entry per VM the trigger concerns, its action
//! from the VM's availability policy, its predicted duration, and a check
//! that every VM has somewhere to go. A plan with a VM that cannot move is
//! Refused: it says which VMs and why, and does not start.

use crate::model::{Fleet, Health, HostIx, OnHostMaintenance, VmIx};
use crate::planner::targets::Targets;
use crate::planner::InFlight;
use crate::policy::Policies;
use crate::time::Timestamp;

use super::{predict, Action, EntryState, Plan, PlanEntry, PlanKind, PlanState};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("no host or rack {name} in the fleet ({hosts} hosts; e.g. {example})")]
    UnknownHost {
        name: String,
        hosts: usize,
        example: String,
    },
    #[error("no VM {0} in the fleet")]
    UnknownVm(String),
    #[error(
        "host {host} is already being drained by plan {plan}; cancel that plan or wait for it"
    )]
    AlreadyDraining { host: String, plan: String },
    #[error("host {0} is unreachable: its VMs cannot be live-migrated (they are restarted per their policy once it is declared lost)")]
    Unreachable(String),
    #[error("nothing to do: {0}")]
    Empty(String),
}

/// The hosts named by `name`: the host of that name, or else every host
/// whose `rack` label is `name`.
pub fn resolve_hosts(fleet: &Fleet, name: &str) -> Result<Vec<HostIx>, DrainError> {
    if let Some(h) = fleet.host_ix(name) {
        return Ok(vec![h]);
    }
    let rack: Vec<HostIx> = (0..fleet.hosts().len())
        .filter(|&h| fleet.host(h).rack() == name)
        .collect();
    if rack.is_empty() {
        return Err(DrainError::UnknownHost {
            name: name.to_string(),
            hosts: fleet.hosts().len(),
            example: fleet.hosts().first().map_or("none".into(), |h| {
                format!("{} in rack {}", h.name, h.rack())
            }),
        });
    }
    Ok(rack)
}

fn entry(fleet: &Fleet, v: VmIx, action: Action) -> PlanEntry {
    let vm = fleet.vm(v);
    let host = fleet.host(fleet.vm_host(v));
    PlanEntry {
        vm: vm.id.clone(),
        tenant: vm.tenant.clone(),
        source: host.name.clone(),
        action,
        target: None,
        predicted_ms: match action {
            Action::Migrate => predicted_ms(fleet, v, None),
            Action::Terminate { .. } => 0,
        },
        predicted_end_ms: None,
        state: EntryState::Pending,
        reason: None,
        attempts: 0,
        avoid: Vec::new(),
        history: Vec::new(),
    }
}

/// The VM's migration alone, to `target` (whose measured setup it is
/// charged) or, before one is chosen, with `ferry bench`'s setup.
fn predicted_ms(fleet: &Fleet, v: VmIx, target: Option<HostIx>) -> u64 {
    let vm = fleet.vm(v);
    let source = fleet.host(fleet.vm_host(v));
    let setup = predict::setup_ms(
        Some(source),
        target.map(|h| fleet.host(h)),
        vm.resources.mem_bytes,
    );
    predict(
        setup,
        vm.populated_bytes,
        vm.dirty_rate,
        source.link_bytes_per_sec,
    )
    .total_ms as u64
}

fn action_for(fleet: &Fleet, v: VmIx) -> Action {
    let a = fleet.vm(v).availability;
    match a.on_host_maintenance {
        OnHostMaintenance::Migrate => Action::Migrate,
        OnHostMaintenance::Terminate => Action::Terminate {
            restart: a.automatic_restart,
        },
    }
}

/// Checks every entry has a place, largest VMs first (as a packer would),
/// and marks the ones without as Blocked with the reason.
fn check_places(
    fleet: &Fleet,
    policies: &Policies,
    in_flight: &[InFlight],
    leaving: &[HostIx],
    plan: &mut Plan,
) {
    let mut targets = Targets::new(fleet, policies, in_flight);
    for &h in leaving {
        targets.exclude(h);
    }
    let mut order: Vec<usize> = (0..plan.entries.len()).collect();
    order.sort_by_key(|&i| {
        let v = fleet
            .vm_ix(&plan.entries[i].vm)
            .expect("entries name fleet VMs");
        std::cmp::Reverse(fleet.vm(v).resources.mem_bytes)
    });
    for i in order {
        let e = &mut plan.entries[i];
        if e.action == (Action::Terminate { restart: false }) {
            e.reason = Some("terminate per policy (no automatic restart)".into());
            continue;
        }
        let v = fleet.vm_ix(&e.vm).expect("entries name fleet VMs");
        match targets.choose(v, fleet.vm_host(v), &[], None) {
            Ok(h) => {
                targets.reserve(v, h);
                e.target = Some(fleet.host(h).name.clone());
                if e.action == Action::Migrate {
                    e.predicted_ms = predicted_ms(fleet, v, Some(h));
                }
            }
            Err(why) => {
                e.state = EntryState::Blocked;
                e.reason = Some(why.to_string());
            }
        }
    }
    if plan.blocked().next().is_some() {
        plan.state = PlanState::Refused;
    }
}

/// A drain (or an evacuation) of the hosts `name` resolves to. Draining
/// hosts of other plans, and hosts in maintenance, are never targets.
pub fn prepare_drain(
    fleet: &Fleet,
    policies: &Policies,
    in_flight: &[InFlight],
    name: &str,
    evacuation: Option<String>,
    now: Timestamp,
) -> Result<Plan, DrainError> {
    let hosts = resolve_hosts(fleet, name)?;
    for &h in &hosts {
        let host = fleet.host(h);
        if let crate::model::Maintenance::Draining { plan } = &host.maintenance {
            return Err(DrainError::AlreadyDraining {
                host: host.name.clone(),
                plan: plan.clone(),
            });
        }
        if let Health::Unreachable { .. } = host.health {
            return Err(DrainError::Unreachable(host.name.clone()));
        }
    }
    let names: Vec<String> = hosts.iter().map(|&h| fleet.host(h).name.clone()).collect();
    let kind = match evacuation {
        None => PlanKind::Drain {
            hosts: names.clone(),
        },
        Some(reason) => PlanKind::Evacuate {
            hosts: names.clone(),
            reason,
        },
    };
    let entries: Vec<PlanEntry> = hosts
        .iter()
        .flat_map(|&h| fleet.vms_on(h))
        .map(|v| entry(fleet, v, action_for(fleet, v)))
        .collect();
    let verb = if evacuation_kind(&kind) {
        "evacuate"
    } else {
        "drain"
    };
    let mut plan = Plan {
        id: format!(
            "{verb}-{}{}-{}",
            names[0],
            if names.len() > 1 {
                format!("+{}", names.len() - 1)
            } else {
                String::new()
            },
            now.ms()
        ),
        priority: kind.priority(),
        kind,
        state: PlanState::Draft,
        created_at: now,
        started_at: None,
        finished_at: None,
        predicted_duration_ms: None,
        entries,
    };
    check_places(fleet, policies, in_flight, &hosts, &mut plan);
    Ok(plan)
}

fn evacuation_kind(k: &PlanKind) -> bool {
    matches!(k, PlanKind::Evacuate { .. })
}

/// An operator's move of one VM, to `to` or wherever fits best.
pub fn prepare_move(
    fleet: &Fleet,
    policies: &Policies,
    in_flight: &[InFlight],
    vm: &str,
    to: Option<&str>,
    now: Timestamp,
) -> Result<Plan, DrainError> {
    let v = fleet
        .vm_ix(vm)
        .ok_or_else(|| DrainError::UnknownVm(vm.to_string()))?;
    if let Some(t) = to {
        if fleet.host_ix(t).is_none() {
            return Err(DrainError::UnknownHost {
                name: t.to_string(),
                hosts: fleet.hosts().len(),
                example: fleet
                    .hosts()
                    .first()
                    .map_or("none".into(), |h| h.name.clone()),
            });
        }
    }
    if !fleet.vm(v).is_running() {
        return Err(DrainError::Empty(format!("VM {vm} is not running")));
    }
    let kind = PlanKind::Move {
        vm: vm.to_string(),
        to: to.map(str::to_string),
    };
    let mut plan = Plan {
        id: format!("move-{vm}-{}", now.ms()),
        priority: kind.priority(),
        kind,
        state: PlanState::Draft,
        created_at: now,
        started_at: None,
        finished_at: None,
        predicted_duration_ms: None,
        entries: vec![entry(fleet, v, Action::Migrate)],
    };
    let source = fleet.vm_host(v);
    let targets = Targets::new(fleet, policies, in_flight);
    let place = match to.and_then(|t| fleet.host_ix(t)) {
        Some(h) => targets.refuse(v, source, h).map_or(Ok(h), Err),
        None => targets
            .choose(v, source, &[], None)
            .map_err(|w| w.to_string()),
    };
    let e = &mut plan.entries[0];
    match place {
        Ok(h) => {
            e.target = Some(fleet.host(h).name.clone());
            e.predicted_ms = predicted_ms(fleet, v, Some(h));
        }
        Err(why) => {
            e.state = EntryState::Blocked;
            e.reason = Some(why);
            plan.state = PlanState::Refused;
        }
    }
    Ok(plan)
}
