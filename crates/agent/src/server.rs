//! The agent itself: its records, ledger and supervised VMMs, what each
//! API call does to them, re-adoption at start, and serving the API on
//! the Unix socket until SIGTERM (which leaves every VM running).

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_control::{Request, Response};
use rustix::process::Signal;
use tokio::sync::watch;

use crate::api::ApiError;
use crate::config::Config;
use crate::events::{AuditOpenError, Event, Events};
use crate::jobs::JobFile;
use crate::ledger::{Holder, Ledger, Reservation};
use crate::metrics::Metrics;
use crate::migration::{IncomingSlot, JobSlot, MigrationJob};
use crate::model::{
    CreateVm, LiveFacts, SnapshotDone, SnapshotRequest, VmDefinition, VmRecord, VmState, VmView,
};
use crate::peer::{PeerSetupError, PeerTls};
use crate::store::{Store, StoreError};
use crate::supervisor::{self, Exit, Vmm, VmmHandle};
use crate::time::now_rfc3339;

/// How long a new VMM may take to answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VMM has to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the state directory {}: {source}", .path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditOpenError),
    #[error("{}: a file that is not a socket is in the way", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: another ferryd already listens there", .0.display())]
    InUse(PathBuf),
    #[error("cannot listen on {}: {source}", .path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Peer(#[from] PeerSetupError),
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
}

/// A VM the agent knows: the lock its modifying calls take, and its VMM.
pub(crate) struct Slot {
    /// Held by a modifying call for its whole length; a second one gets
    /// 409 instead of waiting. A migration job holds it the same way.
    pub(crate) op: Arc<tokio::sync::Mutex<()>>,
    /// The VMM and the news of its exit, while it lives.
    pub(crate) vmm: Mutex<Option<(VmmHandle, watch::Receiver<Option<Exit>>)>>,
    /// Set by delete: the exit it causes is not a failure.
    pub(crate) deleting: AtomicBool,
    /// Set while the VM's memory goes to another host: its VMM exits by
    /// itself at the commit, which is no failure; the job records any
    /// other ending.
    pub(crate) departing: AtomicBool,
    /// The migration job holding `op`, named in its 409s.
    pub(crate) job: Mutex<Option<String>>,
}

impl Slot {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            op: Arc::new(tokio::sync::Mutex::new(())),
            vmm: Mutex::new(None),
            deleting: AtomicBool::new(false),
            departing: AtomicBool::new(false),
            job: Mutex::new(None),
        })
    }
}

pub struct Agent {
    pub config: Config,
    pub(crate) store: Store,
    pub(crate) ledger: Mutex<Ledger>,
    pub(crate) slots: Mutex<HashMap<String, Arc<Slot>>>,
    pub events: Events,
    pub metrics: Metrics,
    /// This host's TLS identity, when the config has a tls_dir.
    pub(crate) peer_tls: Option<PeerTls>,
    /// Outgoing migrations by job id (kept after they end, for GET).
    pub(crate) jobs: Mutex<HashMap<String, Arc<JobSlot>>>,
    /// Incoming migrations by id.
    pub(crate) incoming: Mutex<HashMap<String, Arc<IncomingSlot>>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn reservation(def: &VmDefinition) -> Reservation {
    Reservation {
        mem_bytes: def.mem_bytes,
        vcpus: def.vcpus,
        holder: Holder::Vm,
    }
}

impl Agent {
    /// Opens the state directory and re-adopts every VM its records say
    /// is live.
    pub async fn open(config: Config) -> Result<Arc<Self>, StartError> {
        let dir = &config.state_dir;
        for d in [dir.clone(), dir.join("vms")] {
            std::fs::create_dir_all(&d)
                .map_err(|source| StartError::StateDir { path: d, source })?;
        }
        let peer_tls = match &config.tls_dir {
            Some(d) => Some(PeerTls::load(d, &config.host_name)?),
            None => None,
        };
        let store = Store::open(&dir.join("vms.redb"))?;
        let events = Events::open(&dir.join("audit.jsonl"))?;
        let agent = Arc::new(Self {
            ledger: Mutex::new(Ledger::new(config.capacity)),
            config,
            store,
            slots: Mutex::new(HashMap::new()),
            events,
            metrics: Metrics::new(),
            peer_tls,
            jobs: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
        });
        // Each VMM is asked at once: a mute one delays the start by one
        // status timeout, not one per VM.
        // Jobs in flight when the last agent stopped: their VMs' exits are
        // no failure until the jobs are settled.
        // Ended migrations beyond the retention policy go first; those in
        // flight are never pruned.
        agent.apply_retention();
        let pending: Vec<crate::jobs::JobFile> = crate::jobs::load(&agent.config.state_dir)
            .into_iter()
            .filter(|j| !j.phase.is_done())
            .collect();
        let mut checks = tokio::task::JoinSet::new();
        for record in agent.store.list()? {
            let agent = agent.clone();
            let in_flight = pending.iter().find(|j| j.vm == record.id).cloned();
            checks.spawn(async move { agent.readopt(record, in_flight).await });
        }
        while checks.join_next().await.is_some() {}
        // After the records: a migration whose VM was recorded here has
        // committed, and the record was re-adopted above.
        agent.restore_incoming().await;
        agent.remove_orphaned_taps()?;
        for file in pending {
            let agent2 = agent.clone();
            tokio::spawn(async move { agent2.settle(file).await });
        }
        Ok(agent)
    }

    /// Removes the taps this host's agent made that no VM record and no
    /// live incoming migration names: left by an agent killed between
    /// making a tap and recording it.
    fn remove_orphaned_taps(&self) -> Result<(), StartError> {
        if self.config.networks.is_empty() {
            return Ok(());
        }
        let mut in_use: std::collections::BTreeSet<String> = self
            .store
            .list()?
            .into_iter()
            .filter_map(|r| r.tap.map(|t| t.name))
            .collect();
        in_use.extend(
            crate::incoming::load(&self.config.state_dir)
                .into_iter()
                .filter(|f| {
                    matches!(
                        f.view.phase,
                        crate::migration::IncomingPhase::Ready
                            | crate::migration::IncomingPhase::Committed
                    )
                })
                .filter_map(|f| f.tap.map(|t| t.name)),
        );
        crate::tap_gc::remove_orphans(&self.config.networks, &self.config.host_name, &in_use);
        Ok(())
    }

    /// Takes over the VMM of a live record, or marks the record failed.
    async fn readopt(self: &Arc<Self>, mut record: VmRecord, in_flight: Option<JobFile>) {
        let slot = Slot::new();
        lock(&self.slots).insert(record.id.clone(), slot.clone());
        if let Some(file) = &in_flight {
            // The job is shown, and the VM locked, until it is settled.
            slot.departing.store(true, Ordering::SeqCst);
            *lock(&slot.job) = Some(file.id.clone());
            lock(&self.jobs).insert(
                file.id.clone(),
                Arc::new(JobSlot::restored(self.restored_view(file))),
            );
        }
        if !record.state.is_live() {
            return;
        }
        let verdict = match (record.pid, record.pid_start_time) {
            (Some(pid), Some(start)) => match Vmm::adopt(pid, start) {
                Err(e) => Err(format!(
                    "its VMM (pid {pid}) died while ferryd was down ({e}); last words: {}",
                    supervisor::last_words(&record.log)
                )),
                Ok(vmm) => match supervisor::call(&record.api_socket, Request::Status).await {
                    Ok(Response::Status { paused, .. }) => Ok((vmm, paused)),
                    other => {
                        // Alive but mute: never stopped, still watched,
                        // reported failed so an operator looks.
                        let why = match other {
                            Err(e) => e.to_string(),
                            Ok(r) => format!("unexpected answer {r:?}"),
                        };
                        let reason = format!(
                            "its VMM (pid {pid}) is alive but its API socket does not answer: {why}"
                        );
                        self.watch_vmm(&record.id, &slot, vmm);
                        lock(&self.ledger).force(&record.id, reservation(&record.definition));
                        self.set_state(&mut record, VmState::Failed, Some(reason));
                        return;
                    }
                },
            },
            _ => Err("ferryd stopped before its VMM was started".to_string()),
        };
        match verdict {
            Ok((vmm, paused)) => {
                let pid = vmm.pid;
                lock(&self.ledger).force(&record.id, reservation(&record.definition));
                self.watch_vmm(&record.id, &slot, vmm);
                tracing::info!("re-adopted VM {} (pid {pid})", record.id);
                self.events.publish(Event::VmAdopted {
                    time: now_rfc3339(),
                    vm: record.id.clone(),
                    pid,
                });
                let state = if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                if state != record.state {
                    self.set_state(&mut record, state, None);
                }
            }
            // Its migration may have committed: settling decides.
            Err(reason) if in_flight.is_some() => {
                tracing::warn!("VM {}: {reason}; its migration is being settled", record.id);
            }
            Err(reason) => {
                tracing::warn!("VM {}: {reason}", record.id);
                self.set_state(&mut record, VmState::Failed, Some(reason));
            }
        }
    }

    fn restored_view(&self, file: &JobFile) -> MigrationJob {
        MigrationJob {
            id: file.id.clone(),
            vm: file.vm.clone(),
            source: self.config.host_name.clone(),
            target: file.target.clone(),
            phase: file.phase,
            transport: file.transport.clone(),
            mode: "unknown (ferryd restarted during the migration)".into(),
            downtime_target_ms: None,
            bandwidth_cap: None,
            destination_migration: Some(file.destination_migration.clone()),
            data_plane: None,
            progress: None,
            last_progress: None,
            progress_lines: 0,
            report: None,
            error: None,
            destination_told: None,
            destination_note: None,
            requested_by: file.requested_by.clone(),
            started_at: file.started_at.clone(),
            ended_at: None,
        }
    }

    /// Stores a new state and tells the event stream.
    pub(crate) fn set_state(&self, record: &mut VmRecord, state: VmState, reason: Option<String>) {
        record.state = state;
        record.reason = reason.clone();
        if let Err(e) = self.store.put(record) {
            tracing::error!("cannot store VM {}: {e}", record.id);
        }
        self.events.publish(Event::VmState {
            time: now_rfc3339(),
            vm: record.id.clone(),
            state,
            reason,
        });
    }

    /// Starts the task that waits for `vmm` to exit and records why.
    pub(crate) fn watch_vmm(self: &Arc<Self>, id: &str, slot: &Arc<Slot>, vmm: Vmm) {
        let (tx, rx) = watch::channel(None);
        *lock(&slot.vmm) = Some((vmm.handle(), rx));
        let agent = self.clone();
        let id = id.to_owned();
        let slot = slot.clone();
        tokio::spawn(async move {
            let pid = vmm.pid;
            let exit = vmm.wait().await;
            tracing::info!("VM {id}: VMM pid {pid} {}", exit.description);
            if !slot.deleting.load(Ordering::SeqCst) && !slot.departing.load(Ordering::SeqCst) {
                lock(&agent.ledger).release(&id);
                if let Ok(Some(mut record)) = agent.store.get(&id) {
                    let (state, reason) = if exit.clean {
                        (VmState::Stopped, exit.description.clone())
                    } else {
                        (
                            VmState::Failed,
                            format!(
                                "its VMM {}; last words: {}",
                                exit.description,
                                supervisor::last_words(&record.log)
                            ),
                        )
                    };
                    agent.set_state(&mut record, state, Some(reason));
                }
            }
            *lock(&slot.vmm) = None;
            let _ = tx.send(Some(exit));
        });
    }

    pub(crate) fn slot(&self, id: &str) -> Result<Arc<Slot>, ApiError> {
        lock(&self.slots)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))
    }

    pub(crate) fn record(&self, id: &str) -> Result<VmRecord, ApiError> {
        self.store
            .get(id)
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::NotFound(id.to_owned()))
    }

    /// The slot's operation lock, or 409 if another call (or a migration
    /// job, named) holds it.
    pub(crate) fn begin(
        slot: &Slot,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        slot.op.clone().try_lock_owned().map_err(|_| {
            match lock(&slot.job).as_deref() {
                Some(job) => ApiError::Conflict(format!(
                    "VM {id} is being migrated by job {job}: only queries and DELETE /v1/migrations/{job} are allowed until it ends"
                )),
                None => ApiError::Conflict(format!("another operation on VM {id} is in progress")),
            }
        })
    }

    pub fn list(&self) -> Result<Vec<VmRecord>, ApiError> {
        self.store.list().map_err(ApiError::internal)
    }

    pub fn ledger_figures(&self) -> ((u64, u32), (u64, u32)) {
        let l = lock(&self.ledger);
        let c = l.capacity();
        (l.used(), (c.mem_bytes, c.vcpus))
    }

    pub async fn show(&self, id: &str) -> Result<VmView, ApiError> {
        let record = self.record(id)?;
        let (live, live_error) = if record.state.is_live() {
            match supervisor::call(&record.api_socket, Request::Status).await {
                Ok(Response::Status {
                    uptime_ms,
                    paused,
                    guest,
                    ..
                }) => (
                    Some(LiveFacts {
                        uptime_ms,
                        paused,
                        heartbeat: guest.map(Into::into),
                    }),
                    None,
                ),
                Ok(other) => (None, Some(format!("unexpected answer {other:?}"))),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        Ok(VmView {
            record,
            live,
            live_error,
        })
    }

    /// Checks a definition without touching anything.
    pub(crate) fn validate(req: &CreateVm) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        if let Some(id) = &req.id {
            let ok = !id.is_empty()
                && id.len() <= 63
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !id.starts_with('-');
            if !ok {
                return bad(format!(
                    "id {id:?}: use 1 to 63 lower-case letters, digits and '-'"
                ));
            }
        }
        let def = &req.definition;
        if let Err(e) = ferry_vmm::memory::check_size(def.mem_bytes, u64::MAX) {
            return bad(format!("definition.mem_bytes {}: {e}", def.mem_bytes));
        }
        if def.vcpus == 0 || def.vcpus > ferry_testguest::MAX_VCPUS {
            return bad(format!(
                "definition.vcpus {}: must be 1 to {}",
                def.vcpus,
                ferry_testguest::MAX_VCPUS
            ));
        }
        let workload: ferry_testguest::net::GuestWorkload = match def.workload.parse() {
            Ok(w) => w,
            Err(e) => return bad(format!("definition.workload {:?}: {e}", def.workload)),
        };
        if workload.disk.is_some() && def.disk.is_none() {
            return bad(format!(
                "definition.workload {:?} writes a disk: give the VM one with definition.disk = {{\"path\": IMG}}",
                def.workload
            ));
        }
        if let Some(disk) = &def.disk {
            if !disk.path.is_absolute() {
                return bad(format!(
                    "definition.disk.path {:?}: give the image's absolute path (every host sees it there)",
                    disk.path
                ));
            }
        }
        if workload.net.is_some() && def.net.is_none() {
            return bad(format!(
                "definition.workload {:?} serves the network: give the VM a card with definition.net = {{\"network\": NAME}}",
                def.workload
            ));
        }
        if let Some(net) = &def.net {
            if net.network.is_empty() {
                return bad("definition.net.network: name one of the host's networks".into());
            }
            if let Some(mac) = &net.mac {
                if let Err(e) = crate::network::parse_mac(mac) {
                    return bad(e.to_string());
                }
            }
        }
        let workload = workload.workload;
        let needed = ferry_testguest::guest_mem_needed(&workload);
        if needed >= def.mem_bytes {
            return bad(format!(
                "workload {} needs {} MiB but the VM has {} MiB",
                def.workload,
                needed >> 20,
                def.mem_bytes >> 20
            ));
        }
        if let Some(g) = &def.guest {
            if !g.is_absolute() || !g.is_file() {
                return bad(format!(
                    "definition.guest {}: not an absolute path to a file",
                    g.display()
                ));
            }
        }
        let p = &req.policy;
        if !(p.downtime_ms.is_finite() && p.downtime_ms > 0.0) {
            return bad(format!(
                "policy.downtime_ms {}: must be above zero",
                p.downtime_ms
            ));
        }
        if p.bandwidth == Some(0) || p.completion_timeout_ms == 0 {
            return bad(
                "policy.bandwidth and policy.completion_timeout_ms must be above zero".into(),
            );
        }
        Ok(())
    }

    /// The host's network a card asks for, or a refusal that names the
    /// networks this host has.
    pub(crate) fn network_for(
        &self,
        net: &crate::model::NetDefinition,
    ) -> Result<&crate::config::Network, ApiError> {
        self.config.network(&net.network).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "definition.net.network {:?}: host {} has no such network (it has: {})",
                net.network,
                self.config.host_name,
                self.config.network_names()
            ))
        })
    }

    /// Whether this host sees the VM's disk image (None: no disk, or it
    /// does); Err is the 422 that says why not.
    pub(crate) fn sees_disk(&self, vm: &str, def: &VmDefinition) -> Result<(), ApiError> {
        let Some(disk) = &def.disk else {
            return Ok(());
        };
        match std::fs::metadata(&disk.path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(ApiError::Incompatible(format!(
                "VM {vm}'s disk {} is not a regular file on host {}",
                disk.path.display(),
                self.config.host_name
            ))),
            Err(e) => Err(ApiError::Incompatible(format!(
                "VM {vm}'s disk {} cannot be seen on host {} ({e}): is the shared storage mounted here?",
                disk.path.display(),
                self.config.host_name
            ))),
        }
    }

    /// `POST /v1/vms`: reserve, record, start the VMM, wait for it.
    pub async fn create(self: &Arc<Self>, req: CreateVm) -> Result<VmRecord, ApiError> {
        Self::validate(&req)?;
        self.sees_disk(req.id.as_deref().unwrap_or("(new)"), &req.definition)?;
        let id = req
            .id
            .clone()
            .unwrap_or_else(|| format!("vm-{:08x}", rand::random::<u32>()));
        let mut definition = req.definition;
        let network = match &mut definition.net {
            Some(net) => {
                let network = self.network_for(net)?.clone();
                // Recorded, so that it moves with the VM.
                net.mac
                    .get_or_insert_with(|| crate::network::generate_mac().to_string());
                Some(network)
            }
            None => None,
        };
        // Made before anything is recorded: a host whose bridge is
        // missing refuses the VM and keeps nothing of it.
        let mut tap = match &network {
            Some(n) => Some(TapGuard::new(
                crate::network::create_tap(n, &self.config.host_name)
                    .map_err(|e| ApiError::Incompatible(e.to_string()))?,
                &id,
            )),
            None => None,
        };
        let dir = self.config.state_dir.join("vms").join(&id);
        let mut record = VmRecord {
            id: id.clone(),
            definition,
            policy: req.policy,
            state: VmState::Creating,
            reason: None,
            pid: None,
            pid_start_time: None,
            api_socket: dir.join("api.sock"),
            log: dir.join("console.log"),
            created_at: now_rfc3339(),
            tap: tap.as_ref().map(|t| t.tap.clone()),
        };
        let slot = Slot::new();
        let _op = Self::begin(&slot, &id)?;
        {
            let mut slots = lock(&self.slots);
            if slots.contains_key(&id) {
                return Err(ApiError::Conflict(format!("a VM {id} exists already")));
            }
            if let Some(m) = self.incoming_vm(&id) {
                return Err(ApiError::Conflict(format!(
                    "VM {id} is migrating here ({m})"
                )));
            }
            lock(&self.ledger).reserve(&id, reservation(&record.definition))?;
            if let Err(e) = self.store.insert_new(&record) {
                lock(&self.ledger).release(&id);
                return Err(ApiError::internal(e));
            }
            slots.insert(id.clone(), slot.clone());
        }
        self.events.publish(Event::VmState {
            time: now_rfc3339(),
            vm: id.clone(),
            state: VmState::Creating,
            reason: None,
        });
        // From here the record owns the tap: a failed start removes it.
        if let Some(t) = tap.as_mut() {
            t.disarm();
        }
        let fail = |agent: &Self, mut record: VmRecord, reason: String| {
            lock(&agent.ledger).release(&record.id);
            if let Some(t) = record.tap.take() {
                crate::network::remove_tap_logged(&t, &record.id);
            }
            agent.set_state(&mut record, VmState::Failed, Some(reason.clone()));
            ApiError::Vmm(reason)
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(fail(
                self,
                record,
                format!("cannot create {}: {e}", dir.display()),
            ));
        }
        let net_flag = record.tap.as_ref().map(|t| {
            let mac = record
                .definition
                .net
                .as_ref()
                .and_then(|n| n.mac.clone())
                .unwrap_or_default();
            crate::network::run_flag(t, &mac)
        });
        let vmm = match Vmm::spawn(
            &self.config.ferry_bin,
            &record.definition,
            net_flag.as_deref(),
            &record.api_socket,
            &record.log,
        ) {
            Ok(v) => v,
            Err(e) => return Err(fail(self, record, e.to_string())),
        };
        record.pid = Some(vmm.pid);
        record.pid_start_time = Some(vmm.start_time);
        if let Err(e) = self.store.put(&record) {
            tracing::error!("cannot store VM {id}: {e}");
        }
        self.watch_vmm(&id, &slot, vmm);
        let Some((handle, mut exited)) = lock(&slot.vmm).clone() else {
            return Err(fail(self, record, "its VMM vanished at once".into()));
        };
        match supervisor::wait_until_up(&mut exited, &record.api_socket, &record.log, START_TIMEOUT)
            .await
        {
            Ok(_) => {
                self.set_state(&mut record, VmState::Running, None);
                Ok(record)
            }
            Err(e) => {
                // Do not leave a half-started VMM behind.
                slot.deleting.store(true, Ordering::SeqCst);
                let _ = handle.signal(Signal::KILL);
                let _ = exited.wait_for(Option::is_some).await;
                slot.deleting.store(false, Ordering::SeqCst);
                Err(fail(self, record, e.to_string()))
            }
        }
    }

    /// `DELETE /v1/vms/{id}`: stop the VMM (SIGTERM, then SIGKILL) and
    /// remove the record.
    pub async fn delete(&self, id: &str) -> Result<VmRecord, ApiError> {
        let slot = self.slot(id)?;
        let _op = Self::begin(&slot, id)?;
        let record = self.record(id)?;
        slot.deleting.store(true, Ordering::SeqCst);
        let vmm = lock(&slot.vmm).clone();
        if let Some((handle, mut exited)) = vmm {
            let _ = handle.signal(Signal::TERM);
            let stopped = tokio::time::timeout(STOP_GRACE, exited.wait_for(Option::is_some))
                .await
                .is_ok();
            if !stopped {
                tracing::warn!("VM {id}: VMM pid {} ignored SIGTERM; SIGKILL", handle.pid);
                let _ = handle.signal(Signal::KILL);
                let _ = exited.wait_for(Option::is_some).await;
            }
        }
        if let Some(tap) = &record.tap {
            crate::network::remove_tap_logged(tap, id);
        }
        self.store.remove(id).map_err(ApiError::internal)?;
        lock(&self.ledger).release(id);
        lock(&self.slots).remove(id);
        if let Some(dir) = record.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.events.publish(Event::VmDeleted {
            time: now_rfc3339(),
            vm: id.to_owned(),
        });
        Ok(record)
    }

    /// `POST /v1/vms/{id}/pause` and `/resume`.
    pub async fn pause_or_resume(&self, id: &str, pause: bool) -> Result<VmRecord, ApiError> {
        let slot = self.slot(id)?;
        let _op = Self::begin(&slot, id)?;
        let mut record = self.record(id)?;
        let (from, to, request) = if pause {
            (VmState::Running, VmState::Paused, Request::Pause)
        } else {
            (VmState::Paused, VmState::Running, Request::Resume)
        };
        if record.state != from {
            return Err(ApiError::Conflict(format!(
                "VM {id} is {}, not {}",
                record.state.as_str(),
                from.as_str()
            )));
        }
        match supervisor::call(&record.api_socket, request).await {
            Ok(Response::Paused { .. } | Response::Resumed) => {
                self.set_state(&mut record, to, None);
                Ok(record)
            }
            Ok(Response::Error { message }) => Err(ApiError::Vmm(message)),
            Ok(other) => Err(ApiError::Vmm(format!("unexpected answer {other:?}"))),
            Err(e) => Err(ApiError::Vmm(e.to_string())),
        }
    }

    /// `POST /v1/vms/{id}/snapshot`: the VM pauses, is written, runs on.
    pub async fn snapshot(&self, id: &str, req: SnapshotRequest) -> Result<SnapshotDone, ApiError> {
        if !req.path.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "path {}: must be absolute",
                req.path.display()
            )));
        }
        if !req.path.parent().is_some_and(Path::is_dir) {
            return Err(ApiError::BadRequest(format!(
                "path {}: its directory does not exist",
                req.path.display()
            )));
        }
        let slot = self.slot(id)?;
        let _op = Self::begin(&slot, id)?;
        let record = self.record(id)?;
        if record.state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM {id} is {}: only a running VM can be snapshotted",
                record.state.as_str()
            )));
        }
        let request = Request::Snapshot {
            path: req.path,
            stop: false,
        };
        match supervisor::call_within(&record.api_socket, request, SNAPSHOT_TIMEOUT).await {
            Ok(Response::Snapshot(r)) => Ok(SnapshotDone {
                path: r.path,
                file_bytes: r.stats.file_bytes,
                pause_ms: r.pause_ms,
            }),
            Ok(Response::Error { message }) => Err(ApiError::Vmm(message)),
            Ok(other) => Err(ApiError::Vmm(format!("unexpected answer {other:?}"))),
            Err(e) => Err(ApiError::Vmm(e.to_string())),
        }
    }
}

/// Binds the agent's socket: a stale socket (nothing answers) is
/// replaced, a live one or any other file is an error. Mode 0660.
pub fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, StartError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(StartError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| StartError::Bind {
            path: path.to_owned(),
            source,
        })?;
    }
    let bind_err = |source| StartError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves the API on the configured socket until SIGTERM or SIGINT.
/// The VMs keep running after it returns.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Bind first: a second agent must fail before it touches any record.
    let listener = bind_socket(&config.socket)?;
    let socket = config.socket.clone();
    let agent = match Agent::open(config).await {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let (app, _) = crate::api::router(agent.clone());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(StartError::Serve)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });
    tracing::info!(
        "ferryd {} serving on {} ({} VMs on record)",
        agent.config.host_name,
        socket.display(),
        agent.list().map(|l| l.len()).unwrap_or(0)
    );
    match (agent.config.peer_listen, &agent.peer_tls) {
        (Some(addr), Some(tls)) => {
            let listener = match crate::peer::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(e.into());
                }
            };
            let bound = listener.local_addr().map_err(StartError::Serve)?;
            // Where a test (or a port-0 config) finds the listener.
            let _ = std::fs::write(agent.config.state_dir.join("peer.addr"), bound.to_string());
            tracing::info!(
                "peer listener (mutual TLS 1.3) on {bound} as {}",
                agent.config.host_name
            );
            tokio::spawn(crate::peer::serve(
                listener,
                tls.server.clone(),
                app.clone(),
                stop_rx.clone(),
            ));
        }
        (Some(addr), None) => tracing::warn!(
            "peer_listen {addr} is not served: the config has no tls_dir (no migrations between agents)"
        ),
        _ => {}
    }
    // After the peer listener: the registration names its address.
    let _fleet_member = crate::fleet_member::spawn(&agent);
    let mut graceful = stop_rx.clone();
    let closing = agent.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<crate::api::PeerCred>(),
    )
    .with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
        closing.events.close();
    });
    let serving = tokio::spawn(async move { server.await });
    let _ = stop_rx.wait_for(|s| *s).await;
    tracing::info!("stopping; the VMs keep running");
    // Calls in flight may finish; one that waits on a slow VMM is cut
    // short (the VMM runs on either way).
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// A tap made for a VM that nothing owns yet: removed when dropped unless
/// disarmed (a record or a receiver took it over).
pub(crate) struct TapGuard {
    pub(crate) tap: crate::model::HostTap,
    vm: String,
    armed: bool,
}

impl TapGuard {
    pub(crate) fn new(tap: crate::model::HostTap, vm: &str) -> Self {
        Self {
            tap,
            vm: vm.to_owned(),
            armed: true,
        }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        if self.armed {
            crate::network::remove_tap_logged(&self.tap, &self.vm);
        }
    }
}
