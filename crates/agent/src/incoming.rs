//! Incoming migrations written down under the state directory
//! (`incoming/ID.json`), so that a destination agent killed mid-migration
//! takes its receiver back when it starts again and follows it to its end:
//! committed (the VM runs here and has a record and a reservation) or not
//! (the receiver is gone, its reservation, tap and directory with it).
//!
//! The receiving VMM does the data plane with the source's VMM and needs
//! no agent meanwhile; the truth is in its process and its log ("VM
//! received" once the VM runs here). Ended migrations are read back too,
//! so a source that asks after the restart is told how they ended.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ledger::{Holder, Reservation};
use crate::migration::{read_new, IncomingPhase, IncomingSlot, IncomingView, PeerOffer, RECEIVED};
use crate::model::HostTap;
use crate::server::{lock, Agent, TapGuard};
use crate::supervisor::{self, Vmm};

/// The receiving VMM of an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverProcess {
    pub pid: u32,
    /// The start time the kernel recorded for `pid`: a reused pid never
    /// matches it.
    pub start_time: u64,
}

/// What is kept of an incoming migration across a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingFile {
    pub view: IncomingView,
    /// The offer as this host took it (a copied disk's path is this
    /// host's).
    pub offer: PeerOffer,
    /// None until the receiver is started.
    pub receiver: Option<ReceiverProcess>,
    /// The tap made for the VM's card.
    pub tap: Option<HostTap>,
    /// The source has been given the address and token: from then on it
    /// may be sending. Before that it cannot have connected.
    pub answered: bool,
    /// Where the receiver's log had been read up to when it listened.
    pub log_offset: u64,
    /// When the reservation is released if the VM has not arrived (ms
    /// since the Unix epoch; wall clock, since it outlives this process).
    pub expires_at_ms: u64,
    /// When the offer arrived (ms since the Unix epoch); 0: not known (a
    /// file an older agent wrote, or one taken back after a restart, whose
    /// downtime is no cost of receiving).
    #[serde(default)]
    pub offered_at_ms: u64,
    /// From the offer to the answer: the receiving VMM started and its
    /// memory reserved.
    #[serde(default)]
    pub prepare_ms: Option<u64>,
    /// What receiving the VM cost here, written when it runs here: the
    /// fleet is told the cost of receiving from these (crate::fleet_figures).
    #[serde(default)]
    pub measured: Option<ReceiveMeasured>,
}

/// One committed incoming migration as this host lived it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReceiveMeasured {
    pub mem_bytes: u64,
    /// From the offer to the answer (VMM start, memory reserved).
    pub prepare_ms: u64,
    /// From the offer to the VM running here.
    pub total_ms: u64,
    /// The guest memory the receiver holds once the VM runs: what came.
    pub received_bytes: u64,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming")
}

/// Writes the incoming migration durably.
pub fn save(state_dir: &Path, file: &IncomingFile) -> std::io::Result<()> {
    crate::durable::write_json(&dir(state_dir), &file.view.id, file)
}

/// Every incoming migration on file; unreadable files are logged and
/// skipped.
pub fn load(state_dir: &Path) -> Vec<IncomingFile> {
    crate::durable::read_all_json(&dir(state_dir), "incoming migration")
}

/// Removes an incoming migration that never was offered to anyone.
pub fn forget(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(dir(state_dir).join(format!("{id}.json")));
}

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Agent {
    /// Takes back every incoming migration a previous agent left: ended
    /// ones are shown again, one still in flight is followed to its end.
    /// Runs after the VM records were re-adopted, before the API serves.
    pub(crate) async fn restore_incoming(self: &Arc<Self>) {
        for mut file in load(&self.config.state_dir) {
            let id = file.view.id.clone();
            let inc = IncomingSlot::new(file.view.clone());
            lock(&self.incoming).insert(id.clone(), inc.clone());
            if file.view.phase != IncomingPhase::Ready {
                continue;
            }
            tracing::info!(
                "incoming migration {id} of VM {} was in flight when ferryd stopped: taking it back",
                file.view.vm
            );
            // Its duration now holds this agent's downtime: no measure of
            // what receiving costs.
            file.offered_at_ms = 0;
            self.resume_incoming(inc, &mut file).await;
        }
    }

    async fn resume_incoming(self: &Arc<Self>, inc: Arc<IncomingSlot>, file: &mut IncomingFile) {
        let vm = file.view.vm.clone();
        let vm_dir = self.vm_dir(&vm);
        let (socket, log) = (vm_dir.join("api.sock"), vm_dir.join("console.log"));
        // Adopted (and recorded) before the last agent could write so:
        // the record was re-adopted like any other.
        if lock(&self.slots).contains_key(&vm) {
            let mut v = lock(&inc.view);
            v.phase = IncomingPhase::Committed;
            file.view = v.clone();
            drop(v);
            if let Err(e) = save(&self.config.state_dir, file) {
                tracing::error!("cannot write incoming migration {}: {e}", file.view.id);
            }
            return;
        }
        // From here the tap is this migration's again: it goes unless the
        // VM arrives.
        let mut tap = file.tap.clone().map(|t| TapGuard::new(t, &vm));
        let vmm = match file.receiver {
            Some(r) => Vmm::adopt(r.pid, r.start_time).map_err(|e| e.to_string()),
            None => Err("it had not been started".into()),
        };
        if !file.answered {
            // The source never got the token: nothing can have arrived.
            match vmm {
                Ok(vmm) => crate::migration::stop(vmm).await,
                Err(_) => stop_strays(&socket).await,
            }
            self.end_incoming(
                &inc,
                file,
                IncomingPhase::Failed,
                "ferryd stopped before it answered the source; released".into(),
            );
            return;
        }
        let mut offset = file.log_offset;
        let received = read_new(&log, &mut offset).contains(RECEIVED);
        match vmm {
            Ok(vmm) => {
                lock(&self.ledger).force(
                    &vm,
                    Reservation {
                        mem_bytes: file.offer.definition.mem_bytes,
                        vcpus: file.offer.definition.vcpus,
                        holder: Holder::Incoming,
                    },
                );
                tracing::info!(
                    "incoming migration {}: receiver pid {} re-adopted",
                    file.view.id,
                    vmm.pid
                );
                let left = file.expires_at_ms.saturating_sub(unix_ms_now());
                let deadline = Instant::now() + Duration::from_millis(left);
                let agent = self.clone();
                let file = file.clone();
                tokio::spawn(async move {
                    agent.watch_incoming(inc, vmm, tap, file, deadline).await;
                });
            }
            Err(why) if received => {
                let tap = tap.as_mut().map(|t| {
                    t.disarm();
                    t.tap.clone()
                });
                let why = format!(
                    "its VMM died while ferryd was down ({why}); last words: {}",
                    supervisor::last_words(&log)
                );
                self.adopt_incoming(&inc, file, Err(why), tap, socket, log);
            }
            Err(why) => {
                let words = supervisor::last_words(&log);
                self.end_incoming(
                    &inc,
                    file,
                    IncomingPhase::Failed,
                    format!(
                        "the receiver ended while ferryd was down ({why}), without the VM: {words}"
                    ),
                );
            }
        }
    }
}

/// Kills receivers started for `socket` that no file names (the agent
/// died between starting one and writing its pid down).
async fn stop_strays(socket: &Path) {
    let needle = socket.display().to_string();
    for pid in crate::procs::processes_mentioning(&needle) {
        let Some((_, start)) = supervisor::proc_stat(pid) else {
            continue;
        };
        if let Ok(vmm) = Vmm::adopt(pid, start) {
            tracing::warn!("a receiver no record names (pid {pid}): stopping it");
            crate::migration::stop(vmm).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MigrationPolicy, VmDefinition};

    #[test]
    fn files_survive_a_rewrite_and_a_reload() {
        let state = std::env::temp_dir().join(format!("ferry-incoming-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut file = IncomingFile {
            view: IncomingView {
                id: "in-00000001".into(),
                vm: "vm1".into(),
                job: "mig-1".into(),
                source: Some("hostA".into()),
                phase: IncomingPhase::Ready,
                address: String::new(),
                mem_bytes: 64 << 20,
                reason: None,
                created_at: "2026-12-04T00:00:00.000Z".into(),
            },
            offer: PeerOffer {
                job: "mig-1".into(),
                vm: "vm1".into(),
                definition: VmDefinition {
                    mem_bytes: 64 << 20,
                    vcpus: 1,
                    workload: "idle".into(),
                    guest: None,
                    prealloc: false,
                    net: None,
                    disk: None,
                },
                policy: MigrationPolicy::default(),
                plaintext_data_plane: false,
            },
            receiver: None,
            tap: None,
            answered: false,
            log_offset: 0,
            expires_at_ms: 0,
            offered_at_ms: 0,
            prepare_ms: None,
            measured: None,
        };
        save(&state, &file).unwrap();
        file.receiver = Some(ReceiverProcess {
            pid: 42,
            start_time: 7,
        });
        file.answered = true;
        save(&state, &file).unwrap();
        assert_eq!(load(&state), vec![file]);
        forget(&state, "in-00000001");
        assert!(load(&state).is_empty());
        let _ = std::fs::remove_dir_all(&state);
    }
}
