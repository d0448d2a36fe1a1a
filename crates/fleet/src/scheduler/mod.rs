//! The scheduler: keeps the fleet and its plans, feeds the planner, carries
//! out its decisions through a [`Migrator`], follows every migration to its
//! end, retries, and writes each step to the store before it acts on it.
//! It owns no clock: `tick(now)` is called by a loop on the wall clock
//! (`ferry fleet serve`, next) or on the simulator's clock.

mod error;
mod persist;
mod tick;

use std::collections::{BTreeSet, HashMap};

use crate::migrator::Migrator;
use crate::model::{Fleet, Health, Host, HostIx, Maintenance, Vm};
use crate::plan::drain::{prepare_drain, prepare_move};
use crate::plan::{EntryState, Plan, PlanKind, PlanState};
use crate::planner::{InFlight, RecentStart};
use crate::policy::Policies;
use crate::store::{Backend, FleetStore, LeaseId};
use crate::time::Timestamp;

pub use error::SchedulerError;
pub use tick::TickReport;

/// How long the scheduler's store lease lives without a keep-alive.
pub const LEASE_TTL_MS: u64 = 10_000;

/// Planner rounds and how long each took (wall clock, measured).
#[derive(Debug, Clone, Default)]
pub struct DecisionStats {
    /// Nanoseconds per planner call.
    pub round_ns: Vec<u64>,
    /// VM decisions made in all rounds.
    pub vm_decisions: u64,
    /// Most work items in one round.
    pub max_work: usize,
}

pub struct Scheduler<B: Backend, M: Migrator> {
    store: FleetStore<B>,
    lease: Option<LeaseId>,
    /// A key every write checks (the leader key at the revision of this
    /// scheduler's claim): a deposed leader's writes are refused.
    fence: Option<(String, u64)>,
    migrator: M,
    policies: Policies,
    fleet: Fleet,
    plans: Vec<Plan>,
    revisions: HashMap<String, u64>,
    /// Digests of the plan headers and entries as last written or read.
    written: HashMap<String, u64>,
    recent: Vec<RecentStart>,
    stats: DecisionStats,
    dirty_plans: BTreeSet<usize>,
    dirty_vms: BTreeSet<usize>,
    dirty_hosts: BTreeSet<HostIx>,
}

impl<B: Backend, M: Migrator> Scheduler<B, M> {
    /// Loads the fleet and its plans from the store and takes a lease for
    /// its writes. Plans that were running go on at the next tick: their
    /// migrations in flight are asked about by name, none is started twice.
    pub fn open(
        backend: B,
        migrator: M,
        policies: Option<Policies>,
    ) -> Result<Self, SchedulerError> {
        let lease = backend.grant_lease(LEASE_TTL_MS)?;
        Self::open_fenced(backend, migrator, policies, lease, None)
    }

    /// Opens the scheduler of an elected leader: every write is under the
    /// leader's lease and checks the leader key's revision, so once
    /// another scheduler took over, this one writes nothing.
    pub fn open_as_leader(
        backend: B,
        migrator: M,
        policies: Option<Policies>,
        leadership: &crate::leader::Leadership,
    ) -> Result<Self, SchedulerError> {
        let fence = (crate::leader::LEADER_KEY.to_string(), leadership.revision);
        Self::open_fenced(backend, migrator, policies, leadership.lease, Some(fence))
    }

    fn open_fenced(
        backend: B,
        migrator: M,
        policies: Option<Policies>,
        lease: LeaseId,
        fence: Option<(String, u64)>,
    ) -> Result<Self, SchedulerError> {
        let store = FleetStore::new(backend);
        let policies = match policies {
            Some(p) => p,
            None => store.policies()?.map(|v| v.value).unwrap_or_default(),
        };
        policies.validate()?;
        let mut revisions = HashMap::new();
        let hosts: Vec<Host> = store
            .hosts()?
            .into_iter()
            .map(|v| {
                revisions.insert(persist::host_key(&v.value.name), v.revision);
                v.value
            })
            .collect();
        let vms: Vec<Vm> = store
            .vms()?
            .into_iter()
            .map(|v| {
                revisions.insert(persist::vm_key(&v.value.id), v.revision);
                v.value
            })
            .collect();
        let tenants = store.tenants()?.into_iter().map(|v| v.value).collect();
        let mut written = HashMap::new();
        let mut plans: Vec<Plan> = Vec::new();
        for stored in store.plan_records()? {
            let p = stored.plan;
            let key = persist::plan_key(&p.id);
            revisions.insert(key.clone(), stored.revision);
            // A plan stored whole is written anew, split, when it next
            // changes: no digests for it.
            if stored.entry_revisions.len() == p.entries.len() {
                let header = crate::store::fleet_store::encode_plan_header(&p)?;
                written.insert(key, persist::digest(&header));
                for (i, (e, rev)) in p.entries.iter().zip(&stored.entry_revisions).enumerate() {
                    let key = crate::store::fleet_store::entry_key(&p.id, i);
                    revisions.insert(key.clone(), *rev);
                    let bytes = crate::store::fleet_store::encode(e)?;
                    written.insert(key, persist::digest(&bytes));
                }
            }
            plans.push(p);
        }
        let fleet = Fleet::new(hosts, vms, tenants)?;
        let mut s = Self {
            store,
            lease: Some(lease),
            fence,
            migrator,
            policies,
            fleet,
            plans,
            revisions,
            written,
            recent: Vec::new(),
            stats: DecisionStats::default(),
            dirty_plans: BTreeSet::new(),
            dirty_vms: BTreeSet::new(),
            dirty_hosts: BTreeSet::new(),
        };
        s.recent = s.starts_from_plans();
        Ok(s)
    }

    /// Pacing survives a restart: the starts are in the plans.
    fn starts_from_plans(&self) -> Vec<RecentStart> {
        let mut out = Vec::new();
        for p in &self.plans {
            for e in &p.entries {
                let at = match &e.state {
                    EntryState::Migrating { started_at, .. }
                    | EntryState::Migrated { started_at, .. } => *started_at,
                    _ => continue,
                };
                if let Some(source) = self.fleet.host_ix(&e.source) {
                    out.push(RecentStart { at, source });
                }
            }
        }
        out
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    pub fn migrator(&self) -> &M {
        &self.migrator
    }

    /// Ends the scheduler (as a crash would, without stepping down) and
    /// gives back its migrator: the hosts live on without it.
    pub fn into_migrator(self) -> M {
        self.migrator
    }

    pub fn migrator_mut(&mut self) -> &mut M {
        &mut self.migrator
    }

    pub fn stats(&self) -> &DecisionStats {
        &self.stats
    }

    /// The lease the scheduler writes under.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }

    /// True when this scheduler wrote (or loaded) `key` at `revision`: a
    /// change of the store that is its own, not another writer's.
    pub fn knows(&self, key: &str, revision: u64) -> bool {
        self.revisions.get(key) == Some(&revision)
    }

    pub fn store(&self) -> &FleetStore<B> {
        &self.store
    }

    /// Gives up the lease (a scheduler stepping down): later writes by
    /// this scheduler are refused by the store.
    pub fn step_down(&mut self) -> Result<(), SchedulerError> {
        if let Some(l) = self.lease {
            self.store.backend().revoke_lease(l)?;
        }
        Ok(())
    }

    fn plan_ix(&self, id: &str) -> Result<usize, SchedulerError> {
        self.plans
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| SchedulerError::NoPlan(id.to_string()))
    }

    /// Migrations in flight in every plan.
    pub fn in_flight(&self) -> Vec<InFlight> {
        let mut out = Vec::new();
        for p in &self.plans {
            for e in &p.entries {
                if let EntryState::Migrating { target, .. } = &e.state {
                    if let (Some(vm), Some(source), Some(target)) = (
                        self.fleet.vm_ix(&e.vm),
                        self.fleet.host_ix(&e.source),
                        self.fleet.host_ix(target),
                    ) {
                        out.push(InFlight { vm, source, target });
                    }
                }
            }
        }
        out
    }

    /// Takes a plan prepared elsewhere (the dry run's copy; a plan
    /// written by a previous leader is loaded by `open`).
    pub fn insert_plan(&mut self, plan: Plan) -> Result<&Plan, SchedulerError> {
        if self.plans.iter().any(|p| p.id == plan.id) {
            return Err(SchedulerError::WrongState {
                plan: plan.id,
                state: PlanState::Draft,
                wanted: "a plan of that id exists already",
            });
        }
        self.add_plan(plan)
    }

    fn add_plan(&mut self, plan: Plan) -> Result<&Plan, SchedulerError> {
        self.plans.push(plan);
        let i = self.plans.len() - 1;
        self.dirty_plans.insert(i);
        self.persist()?;
        Ok(&self.plans[i])
    }

    /// Prepares a drain of a host, or of every host of a rack, as a Draft
    /// (or Refused) plan with its dry run, and stores it. Nothing moves.
    /// It supersedes the drafts and refused plans of the same hosts: each
    /// dry run would otherwise leave one more behind.
    pub fn prepare_drain(&mut self, name: &str, now: Timestamp) -> Result<&Plan, SchedulerError> {
        let in_flight = self.in_flight();
        let mut plan = prepare_drain(&self.fleet, &self.policies, &in_flight, name, None, now)?;
        if plan.state == PlanState::Draft {
            crate::plan::dry_run::apply(&self.fleet, &self.policies, &mut plan);
        }
        let superseded: Vec<String> = self
            .plans
            .iter()
            .filter(|p| matches!(p.state, PlanState::Draft | PlanState::Refused))
            .filter(|p| {
                matches!(p.kind, PlanKind::Drain { .. }) && p.kind.hosts() == plan.kind.hosts()
            })
            .map(|p| p.id.clone())
            .collect();
        self.forget_plans(&superseded)?;
        self.add_plan(plan)
    }

    /// Prepares an operator's move of one VM.
    pub fn prepare_move(
        &mut self,
        vm: &str,
        to: Option<&str>,
        now: Timestamp,
    ) -> Result<&Plan, SchedulerError> {
        let in_flight = self.in_flight();
        let plan = prepare_move(&self.fleet, &self.policies, &in_flight, vm, to, now)?;
        self.add_plan(plan)
    }

    /// A failure signal: the host is marked degraded (it receives nothing)
    /// and an evacuation of its VMs starts at once, ahead of every other
    /// plan; VMs that cannot move stay blocked, the others go.
    pub fn evacuate(
        &mut self,
        host: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<String, SchedulerError> {
        let in_flight = self.in_flight();
        let plan = prepare_drain(
            &self.fleet,
            &self.policies,
            &in_flight,
            host,
            Some(reason.to_string()),
            now,
        )?;
        for h in plan.kind.hosts().to_vec() {
            let h = self.fleet.host_ix(&h).expect("resolved");
            self.fleet.set_health(
                h,
                Health::Degraded {
                    reason: reason.to_string(),
                },
            );
            self.dirty_hosts.insert(h);
        }
        let id = plan.id.clone();
        self.add_plan(plan)?;
        self.start_plan(&id, now, true)?;
        Ok(id)
    }

    /// Starts a Draft plan (a Refused one is refused, with its blocked
    /// VMs).
    pub fn execute(&mut self, id: &str, now: Timestamp) -> Result<(), SchedulerError> {
        self.start_plan(id, now, false)
    }

    fn start_plan(
        &mut self,
        id: &str,
        now: Timestamp,
        even_if_refused: bool,
    ) -> Result<(), SchedulerError> {
        let i = self.plan_ix(id)?;
        let p = &mut self.plans[i];
        match p.state {
            PlanState::Draft => {}
            PlanState::Refused if even_if_refused => {}
            PlanState::Refused => {
                return Err(SchedulerError::PlanRefused {
                    plan: id.to_string(),
                    blocked: p
                        .blocked()
                        .map(|e| (e.vm.clone(), e.reason.clone().unwrap_or_default()))
                        .collect(),
                })
            }
            state => {
                return Err(SchedulerError::WrongState {
                    plan: id.to_string(),
                    state,
                    wanted: "only a draft plan executes (resume a cancelled one)",
                })
            }
        }
        p.state = PlanState::Running;
        p.started_at = Some(now);
        self.dirty_plans.insert(i);
        self.mark_hosts(i, true);
        self.persist()
    }

    fn mark_hosts(&mut self, i: usize, draining: bool) {
        let id = self.plans[i].id.clone();
        for name in self.plans[i].kind.hosts().to_vec() {
            if let Some(h) = self.fleet.host_ix(&name) {
                let m = if draining {
                    Maintenance::Draining { plan: id.clone() }
                } else {
                    Maintenance::None
                };
                self.fleet.set_maintenance(h, m);
                self.dirty_hosts.insert(h);
            }
        }
    }

    /// Stops a running plan: no new migration starts, those in flight are
    /// cancelled back to their sources, and the hosts take VMs again.
    /// What already moved stays moved.
    pub fn cancel(&mut self, id: &str, now: Timestamp) -> Result<(), SchedulerError> {
        let i = self.plan_ix(id)?;
        if self.plans[i].state != PlanState::Running {
            return Err(SchedulerError::WrongState {
                plan: id.to_string(),
                state: self.plans[i].state,
                wanted: "only a running plan can be cancelled",
            });
        }
        for ei in 0..self.plans[i].entries.len() {
            let e = &self.plans[i].entries[ei];
            match &e.state {
                EntryState::Migrating { migration, .. } => {
                    let migration = migration.clone();
                    // Cancelling a migration that already committed leaves
                    // it committed: what the migrator says next decides.
                    let _refused_after_commit = self.migrator.cancel(&migration, now);
                    let status = self.migrator.poll(&migration, now);
                    if !self.follow_committed(i, ei, status, now) {
                        let e = &mut self.plans[i].entries[ei];
                        e.state = EntryState::Cancelled;
                        e.reason =
                            Some("cancelled by the operator; the VM runs on its source".into());
                    }
                }
                EntryState::Pending => {
                    let e = &mut self.plans[i].entries[ei];
                    e.state = EntryState::Cancelled;
                    e.reason = Some("cancelled by the operator before it started".into());
                }
                _ => {}
            }
        }
        self.plans[i].state = PlanState::Cancelled;
        self.dirty_plans.insert(i);
        self.mark_hosts(i, false);
        self.persist()
    }

    /// Runs a cancelled plan again from where it stopped.
    pub fn resume(&mut self, id: &str, _now: Timestamp) -> Result<(), SchedulerError> {
        let i = self.plan_ix(id)?;
        if self.plans[i].state != PlanState::Cancelled {
            return Err(SchedulerError::WrongState {
                plan: id.to_string(),
                state: self.plans[i].state,
                wanted: "only a cancelled plan resumes",
            });
        }
        for e in &mut self.plans[i].entries {
            if e.state == EntryState::Cancelled {
                e.state = EntryState::Pending;
                e.reason = None;
            }
        }
        self.plans[i].state = PlanState::Running;
        self.dirty_plans.insert(i);
        self.mark_hosts(i, true);
        self.persist()
    }

    /// A host's health changed (its lease lapsed, a failure signal): it
    /// receives nothing while not healthy, and migrations towards it are
    /// aborted back to their sources at the next tick and tried elsewhere.
    pub fn set_health(&mut self, host: &str, health: Health) -> Result<(), SchedulerError> {
        let h = self
            .fleet
            .host_ix(host)
            .ok_or_else(|| crate::plan::DrainError::UnknownHost {
                name: host.to_string(),
                hosts: self.fleet.hosts().len(),
                example: String::new(),
            })?;
        self.fleet.set_health(h, health);
        self.dirty_hosts.insert(h);
        self.persist()
    }
}
