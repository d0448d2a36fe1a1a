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
/// The pauses between the tries of an abort to a destination that cannot
/// be reached: 7 tries over about 30 s.
const ABORT_BACKOFF: [Duration; 6] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(12),
];
const ABORT_TRIES: usize = ABORT_BACKOFF.len() + 1;
/// One try's limit: a destination that takes the connection and never
/// answers must not stretch the tries past their bound.
const ABORT_CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long a migrated VM's tap may wait for its old VMM to exit (it
/// forwards stray frames until then) before it is removed anyway.
const TAP_OUTLIVES: Duration = Duration::from_secs(60);

impl Agent {
    /// Tells the destination to drop what it prepared, retrying a
    /// destination that cannot be reached (it may be restarting) with a
    /// bounded backoff; the job records whether it was told and why not.
    /// One never told releases by itself after its completion timeout.
    pub(crate) async fn abort_remote(&self, client: &Arc<rustls::ClientConfig>, job: &JobSlot) {
        let (target, dest) = {
            let v = lock(&job.view);
            (v.target.clone(), v.destination_migration.clone())
        };
        let Some(dest) = dest else { return };
        let path = format!("/v1/peer/migrations/{dest}");
        let started = Instant::now();
        let mut last = String::new();
        for (attempt, pause) in std::iter::once(Duration::ZERO)
            .chain(ABORT_BACKOFF.iter().copied())
            .enumerate()
        {
            tokio::time::sleep(pause).await;
            let call =
                crate::peer::call(client, &target.host, &target.address, "DELETE", &path, None);
            let verdict = match tokio::time::timeout(ABORT_CALL_LIMIT, call).await {
                Err(_) => Err(format!("no answer within {ABORT_CALL_LIMIT:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(r)) if r.is_success() => Ok(None),
                // It holds nothing of it (any more): nothing to release.
                Ok(Ok(r)) if r.status == 404 => Ok(Some("it no longer knew the migration")),
                Ok(Ok(r)) if r.status == 409 => {
                    tracing::error!(
                        "aborting {dest} on {}: it says it has committed ({}) while the VM runs here",
                        target.host,
                        r.reason()
                    );
                    Ok(Some("it refused, saying it had committed"))
                }
                Ok(Ok(r)) if r.status < 500 => {
                    last = format!("{} {}", r.status, r.reason());
                    tracing::warn!("aborting {dest} on {}: refused: {last}", target.host);
                    break;
                }
                Ok(Ok(r)) => Err(format!("{} {}", r.status, r.reason())),
            };
            match verdict {
                Ok(note) => {
                    if attempt > 0 {
                        tracing::info!(
                            "aborting {dest} on {}: told at try {} of {ABORT_TRIES}",
                            target.host,
                            attempt + 1
                        );
                    }
                    let mut v = lock(&job.view);
                    v.destination_told = Some(true);
                    v.destination_note = Some(match note {
                        None => format!("{} was told to release it", target.host),
                        Some(n) => format!("{} was told ({n})", target.host),
                    });
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        "aborting {dest} on {} (try {} of {ABORT_TRIES}): {e}",
                        target.host,
                        attempt + 1
                    );
                    last = e;
                }
            }
        }
        let mut v = lock(&job.view);
        v.destination_told = Some(false);
        let note = format!(
            "{} could not be told to release it ({:.0} s of tries; last: {last}): it releases its reservation by itself once the migration's completion timeout has passed",
            target.host,
            started.elapsed().as_secs_f64()
        );
        tracing::error!("aborting {dest}: {note}");
        v.destination_note = Some(note);
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
