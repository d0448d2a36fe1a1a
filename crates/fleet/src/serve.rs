//! `ferry fleet serve`'s loop: campaign; while leading, tick the scheduler
//! on the wall clock, keep the lease alive, and mark hosts whose leases
//! lapsed unreachable; when the leadership is lost (a fenced write, a
//! lapsed lease) stop scheduling at once and campaign again. On stop the
//! leader resigns, so a follower takes over without waiting for the TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::hosts::apply_liveness;
use crate::leader::{Campaign, Candidate, LeaderError, LEADER_KEY};
use crate::migrator::Migrator;
use crate::scheduler::{Scheduler, SchedulerError};
use crate::store::{Backend, FleetStore, StoreError};
use crate::time::Timestamp;
use crate::watch::PlanWatch;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub name: String,
    /// The leadership outlives a dead leader by this much.
    pub lease_ttl_ms: u64,
    pub tick_ms: u64,
    /// Stop after this long (None: until `stop` is set).
    pub max_run: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeEvent {
    Following {
        leader: String,
    },
    Leading {
        revision: u64,
    },
    Lost {
        why: String,
    },
    /// Another writer (a host registering, an operator's drain or cancel)
    /// changed a record the leader holds: it reloads the fleet from the
    /// store and goes on leading.
    Reload {
        why: String,
    },
    HostsChanged(Vec<String>),
    StoreError(String),
}

/// A write refused by its fence: the lease, or the leader key.
fn lost_leadership(e: &SchedulerError) -> bool {
    match e {
        SchedulerError::Store(StoreError::Fenced(_)) => true,
        SchedulerError::Store(StoreError::Conflict { key, .. }) => key == LEADER_KEY,
        _ => false,
    }
}

fn stale_record(e: &SchedulerError) -> bool {
    matches!(e, SchedulerError::Store(StoreError::Conflict { .. }))
}

/// Runs until `stop` or `cfg.max_run`. `migrator` makes the migrator a
/// new leader drives, from the fleet's store; `before_tick` runs before
/// each tick (the simulated migrator advances its clock there).
pub fn serve<B, M>(
    backend: B,
    cfg: &ServeConfig,
    stop: &AtomicBool,
    mut migrator: impl FnMut(&FleetStore<B>) -> Result<M, StoreError>,
    mut before_tick: impl FnMut(&mut M, Timestamp),
    mut event: impl FnMut(ServeEvent),
) -> Result<(), ServeError>
where
    B: Backend + Clone,
    M: Migrator,
{
    let started = Instant::now();
    let over =
        || stop.load(Ordering::Relaxed) || cfg.max_run.is_some_and(|m| started.elapsed() >= m);
    let mut cand = Candidate::new(&cfg.name, cfg.lease_ttl_ms)?;
    let tick = Duration::from_millis(cfg.tick_ms.max(10));
    let keep_every = Duration::from_millis((cfg.lease_ttl_ms / 3).max(100));
    let mut following = String::new();
    while !over() {
        let lead = match cand.try_lead(&backend) {
            Ok(Campaign::Won(l)) => l,
            Ok(Campaign::Held { by }) => {
                if by != following {
                    event(ServeEvent::Following { leader: by.clone() });
                    following = by;
                }
                std::thread::sleep(keep_every.min(tick * 5));
                continue;
            }
            Err(LeaderError::Store(e)) => {
                // etcd unreachable: nothing is scheduled; try again.
                event(ServeEvent::StoreError(e.to_string()));
                std::thread::sleep(keep_every);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        following.clear();
        event(ServeEvent::Leading {
            revision: lead.revision,
        });
        let watch = PlanWatch::starting_now(&backend);
        let opened = migrator(&FleetStore::new(backend.clone()))
            .map_err(SchedulerError::from)
            .and_then(|m| Scheduler::open_as_leader(backend.clone(), m, None, &lead));
        let loaded = watch
            .map_err(SchedulerError::from)
            .and_then(|w| opened.map(|s| (s, w)));
        let (mut s, mut watch) = match loaded {
            Ok(s) => s,
            // etcd unreachable while loading: campaign again.
            Err(SchedulerError::Store(e)) => {
                event(ServeEvent::StoreError(e.to_string()));
                std::thread::sleep(keep_every);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut kept = Instant::now();
        while !over() {
            if kept.elapsed() >= keep_every {
                match backend.keep_alive(lead.lease) {
                    Ok(()) => kept = Instant::now(),
                    Err(e) => {
                        event(ServeEvent::Lost { why: e.to_string() });
                        break;
                    }
                }
            }
            // A plan another process wrote (a drain, a cancel): campaigning
            // again keeps the claim and loads it.
            match watch.foreign_plan_change(&backend, |k, r| s.knows(k, r)) {
                Ok(Some(key)) => {
                    event(ServeEvent::Reload {
                        why: format!("{key} was written by another process"),
                    });
                    break;
                }
                Ok(None) => {}
                Err(e @ StoreError::Compacted { .. }) => {
                    event(ServeEvent::Reload { why: e.to_string() });
                    break;
                }
                Err(e) => event(ServeEvent::StoreError(e.to_string())),
            }
            let now = Timestamp::now_wall();
            before_tick(s.migrator_mut(), now);
            let step = apply_liveness(&mut s, now).and_then(|changed| {
                if !changed.is_empty() {
                    event(ServeEvent::HostsChanged(changed));
                }
                s.tick(now)
            });
            match step {
                Ok(_) => {}
                Err(e) if lost_leadership(&e) => {
                    event(ServeEvent::Lost { why: e.to_string() });
                    break;
                }
                // Campaigning again keeps the claim and reloads the fleet.
                Err(e) if stale_record(&e) => {
                    event(ServeEvent::Reload { why: e.to_string() });
                    break;
                }
                // etcd unreachable: no new moves until it answers.
                Err(e) => event(ServeEvent::StoreError(e.to_string())),
            }
            std::thread::sleep(tick);
        }
    }
    cand.resign(&backend)?;
    Ok(())
}
