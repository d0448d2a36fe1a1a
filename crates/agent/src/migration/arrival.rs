//! The destination follows its receiver until the VM runs here (it is
//! adopted as a record) or the migration ends without it (everything
//! prepared for it is released).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{read_new, reservation, stop, IncomingPhase, IncomingSlot, RECEIVED, TOKEN_FILE};
use crate::incoming::IncomingFile;
use crate::ledger::Holder;
use crate::model::{HostTap, VmRecord, VmState};
use crate::server::{lock, Agent, Slot, TapGuard};
use crate::supervisor::{self, Vmm};
use crate::time::now_rfc3339;

impl Agent {
    /// Follows a prepared receiver until the VM has arrived (then adopts
    /// it), the receiver ends, the source aborts or the time is up; each
    /// outcome is written to `file`. The tap (if the VM has a card) is
    /// removed with the rest unless the VM arrives.
    pub(crate) async fn watch_incoming(
        self: Arc<Self>,
        inc: Arc<IncomingSlot>,
        mut vmm: Vmm,
        mut tap: Option<TapGuard>,
        mut file: IncomingFile,
        deadline: Instant,
    ) {
        let dir = self.vm_dir(&file.view.vm);
        let (socket, log) = (dir.join("api.sock"), dir.join("console.log"));
        let mut offset = file.log_offset;
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(50), inc.wake.notified()).await;
            if read_new(&log, &mut offset).contains(RECEIVED) {
                let tap = tap.as_mut().map(|t| {
                    t.disarm();
                    t.tap.clone()
                });
                self.adopt_incoming(&inc, &mut file, Ok(vmm), tap, socket, log);
                return;
            }
            let aborted = inc.abort.load(Ordering::SeqCst);
            let expired = Instant::now() >= deadline;
            if aborted || expired {
                stop(vmm).await;
                if aborted {
                    self.end_incoming(
                        &inc,
                        &mut file,
                        IncomingPhase::Aborted,
                        "the source aborted it".into(),
                    );
                } else {
                    self.end_incoming(
                        &inc,
                        &mut file,
                        IncomingPhase::Expired,
                        "the VM did not arrive in time; released".into(),
                    );
                }
                return;
            }
            if vmm.has_exited() {
                let exit = vmm.wait().await;
                let words = supervisor::last_words(&log);
                self.end_incoming(
                    &inc,
                    &mut file,
                    IncomingPhase::Failed,
                    format!("the receiver {} without the VM: {words}", exit.description),
                );
                return;
            }
        }
    }

    /// An incoming migration ended without the VM: its reservation and
    /// directory go (its tap goes with the caller's guard), and the
    /// outcome is shown and written down.
    pub(crate) fn end_incoming(
        &self,
        inc: &IncomingSlot,
        file: &mut IncomingFile,
        phase: IncomingPhase,
        reason: String,
    ) {
        lock(&self.ledger).release(&file.view.vm);
        let _ = std::fs::remove_dir_all(self.vm_dir(&file.view.vm));
        let mut v = lock(&inc.view);
        tracing::info!("incoming migration {}: {phase:?}: {reason}", v.id);
        v.phase = phase;
        v.reason = Some(reason);
        file.view = v.clone();
        drop(v);
        if let Err(e) = crate::incoming::save(&self.config.state_dir, file) {
            tracing::error!("cannot write incoming migration {}: {e}", file.view.id);
        }
        self.apply_retention();
    }

    /// The VM runs here: it gets its record and reservation. `vmm`: its
    /// receiver, supervised from now on, or why it is gone (it ended while
    /// no agent watched it, after the VM had arrived: the record says the
    /// VM failed here).
    pub(crate) fn adopt_incoming(
        self: &Arc<Self>,
        inc: &IncomingSlot,
        file: &mut IncomingFile,
        vmm: Result<Vmm, String>,
        tap: Option<HostTap>,
        api_socket: PathBuf,
        log: PathBuf,
    ) {
        // The token has done its one job.
        if let Some(dir) = log.parent() {
            let _ = std::fs::remove_file(dir.join(TOKEN_FILE));
        }
        let offer = &file.offer;
        let (pid, pid_start_time) = match &vmm {
            Ok(v) => (Some(v.pid), Some(v.start_time)),
            Err(_) => (None, None),
        };
        let mut record = VmRecord {
            id: offer.vm.clone(),
            definition: offer.definition.clone(),
            policy: offer.policy.clone(),
            state: VmState::Running,
            reason: None,
            pid,
            pid_start_time,
            api_socket,
            log,
            created_at: now_rfc3339(),
            tap,
        };
        let slot = Slot::new();
        {
            let mut slots = lock(&self.slots);
            match &vmm {
                Ok(_) => lock(&self.ledger)
                    .force(&record.id, reservation(&record.definition, Holder::Vm)),
                Err(_) => lock(&self.ledger).release(&record.id),
            }
            if let Err(e) = self.store.insert_new(&record) {
                tracing::error!("cannot store the received VM {}: {e}", record.id);
            }
            slots.insert(record.id.clone(), slot.clone());
        }
        let from = inc
            .source
            .clone()
            .unwrap_or_else(|| "a local operator".into());
        match vmm {
            Ok(vmm) => {
                self.watch_vmm(&record.id, &slot, vmm);
                self.set_state(
                    &mut record,
                    VmState::Running,
                    Some(format!("migrated in from {from}")),
                );
            }
            Err(why) => self.set_state(
                &mut record,
                VmState::Failed,
                Some(format!("migrated in from {from}, then {why}")),
            ),
        }
        if let (Some(pid), Some(prepare_ms)) = (pid, file.prepare_ms) {
            if file.offered_at_ms > 0 {
                let m = crate::incoming::ReceiveMeasured {
                    mem_bytes: file.offer.definition.mem_bytes,
                    prepare_ms,
                    total_ms: crate::incoming::unix_ms_now().saturating_sub(file.offered_at_ms),
                    received_bytes: crate::fleet_figures::populated_bytes(pid)
                        .unwrap_or(file.offer.definition.mem_bytes),
                };
                tracing::info!(
                    "incoming migration {}: prepared in {} ms, VM running here {} ms after the offer ({} MiB received)",
                    file.view.id,
                    m.prepare_ms,
                    m.total_ms,
                    m.received_bytes >> 20
                );
                file.measured = Some(m);
            }
        }
        let mut v = lock(&inc.view);
        v.phase = IncomingPhase::Committed;
        v.reason = None;
        tracing::info!("incoming migration {}: VM {} runs here", v.id, record.id);
        file.view = v.clone();
        drop(v);
        if let Err(e) = crate::incoming::save(&self.config.state_dir, file) {
            tracing::error!("cannot write incoming migration {}: {e}", file.view.id);
        }
        self.apply_retention();
    }
}
