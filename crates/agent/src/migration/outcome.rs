//! How an outgoing migration ends on the source: the destination told to
//! let go, the commit confirmed, the record removed once the VM runs
//! there, or marked failed when the source VMM is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{IncomingPhase, IncomingView, JobSlot, MigrationTarget};
use crate::events::Event;
use crate::model::{VmRecord, VmState};
use crate::server::{lock, Agent, Slot};
use crate::supervisor;
use crate::time::now_rfc3339;

/// How long the source waits for the destination to report the commit
/// after its VMM said the VM moved.
const COMMIT_CONFIRM: Duration = Duration::from_secs(30);
/// How long a migrated VM's tap may wait for its old VMM to exit (it
/// forwards stray frames until then) before it is removed anyway.
const TAP_OUTLIVES: Duration = Duration::from_secs(60);

impl Agent {
    /// Tells the destination to drop what it prepared (best effort: it
    /// releases it by itself after its timeout anyway).
    pub(crate) async fn abort_remote(&self, client: &Arc<rustls::ClientConfig>, job: &JobSlot) {
        let (target, dest) = {
            let v = lock(&job.view);
            (v.target.clone(), v.destination_migration.clone())
        };
        let Some(dest) = dest else { return };
        let path = format!("/v1/peer/migrations/{dest}");
        match crate::peer::call(client, &target.host, &target.address, "DELETE", &path, None).await
        {
            Ok(r) if r.is_success() => {}
            Ok(r) => tracing::warn!(
                "aborting {dest} on {}: {} {}",
                target.host,
                r.status,
                r.reason()
            ),
            Err(e) => tracing::warn!("aborting {dest} on {}: {e}", target.host),
        }
    }

    /// The source VMM ended (or cannot run the VM) during a migration
    /// that did not commit: the record says so.
    pub(crate) fn source_lost(&self, slot: &Slot, record: &VmRecord, why: &str) {
        let mut r = record.clone();
        if lock(&slot.vmm).is_none() {
            lock(&self.ledger).release(&r.id);
        }
        self.set_state(
            &mut r,
            VmState::Failed,
            Some(format!(
                "a migration failed and the VM does not run here: {why}; last words: {}",
                supervisor::last_words(&record.log)
            )),
        );
    }

    /// Waits (bounded) until the destination says the VM runs there.
    pub(crate) async fn confirm_commit(&self, client: &Arc<rustls::ClientConfig>, job: &JobSlot) {
        let (target, dest) = {
            let v = lock(&job.view);
            (v.target.clone(), v.destination_migration.clone())
        };
        let Some(dest) = dest else { return };
        let path = format!("/v1/peer/migrations/{dest}");
        let deadline = Instant::now() + COMMIT_CONFIRM;
        while Instant::now() < deadline {
            if let Ok(r) =
                crate::peer::call(client, &target.host, &target.address, "GET", &path, None).await
            {
                if let Ok(v) = serde_json::from_slice::<IncomingView>(&r.body) {
                    if v.phase != IncomingPhase::Ready {
                        if v.phase != IncomingPhase::Committed {
                            tracing::error!(
                                "{dest} on {}: the source VMM reported the commit, but the destination says {:?}: {}",
                                target.host,
                                v.phase,
                                v.reason.unwrap_or_default()
                            );
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::error!(
            "{dest} on {}: the destination did not confirm the commit within {COMMIT_CONFIRM:?}",
            target.host
        );
    }

    /// The VM runs on the destination now: its record here goes, its VMM
    /// exits by itself (and that exit is no failure).
    pub(crate) fn migrated_away(&self, slot: &Slot, record: &VmRecord, target: &MigrationTarget) {
        if let Err(e) = self.store.remove(&record.id) {
            tracing::error!("cannot remove the record of VM {}: {e}", record.id);
        }
        lock(&self.ledger).release(&record.id);
        lock(&self.slots).remove(&record.id);
        if let Some(tap) = record.tap.clone() {
            // The old VMM forwards stray frames from its tap to the new
            // host until it exits: the tap goes after it.
            let exited = lock(&slot.vmm).clone().map(|(_, rx)| rx);
            let vm = record.id.clone();
            tokio::spawn(async move {
                if let Some(mut rx) = exited {
                    let _ = tokio::time::timeout(TAP_OUTLIVES, rx.wait_for(Option::is_some)).await;
                }
                crate::network::remove_tap_logged(&tap, &vm);
            });
        }
        if let Some(dir) = record.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.events.publish(Event::VmMigrated {
            time: now_rfc3339(),
            vm: record.id.clone(),
            to: target.host.clone(),
        });
    }
}
