//! How long ended migrations stay on file: `state/jobs/*.json` (outgoing)
//! and `state/incoming/*.json` (incoming) are kept so that a restarted
//! agent can settle what was in flight and say how the rest ended, but
//! ended ones would pile up forever. The `[retention]` policy keeps the
//! newest `keep` ended files of each kind and none older than
//! `max_age_hours`; a migration that has not ended is never pruned,
//! whatever its age. Applied when the agent starts and after each
//! migration ends.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::incoming::IncomingFile;
use crate::jobs::JobFile;
use crate::migration::IncomingPhase;
use crate::server::{lock, Agent};

/// The `[retention]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Ended migrations kept on file, per kind (outgoing, incoming).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Ended migrations older than this go, however few there are.
    #[serde(default = "default_max_age_hours")]
    pub max_age_hours: u64,
}

fn default_keep() -> usize {
    200
}

fn default_max_age_hours() -> u64 {
    168
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: default_keep(),
            max_age_hours: default_max_age_hours(),
        }
    }
}

impl Retention {
    pub fn check(&self) -> Result<(), String> {
        if self.max_age_hours == 0 {
            return Err("max_age_hours must be at least 1".into());
        }
        Ok(())
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_hours.saturating_mul(3600))
    }
}

/// One file as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: String,
    ended: bool,
    /// Last written: an ended file was last written when it ended.
    modified: SystemTime,
}

/// The ids of the entries `policy` removes at `now`.
fn doomed(entries: &[Entry], policy: &Retention, now: SystemTime) -> Vec<String> {
    let mut ended: Vec<&Entry> = entries.iter().filter(|e| e.ended).collect();
    ended.sort_by(|a, b| b.modified.cmp(&a.modified).then_with(|| a.id.cmp(&b.id)));
    ended
        .iter()
        .enumerate()
        .filter(|(rank, e)| {
            let age = now.duration_since(e.modified).unwrap_or_default();
            *rank >= policy.keep || age > policy.max_age()
        })
        .map(|(_, e)| e.id.clone())
        .collect()
}

/// Applies `policy` to the `*.json` files of `dir` that decode as `T`
/// (`ended` says which have ended; files that do not decode are left
/// alone); the ids removed.
fn prune_dir<T: DeserializeOwned>(
    dir: &Path,
    policy: &Retention,
    now: SystemTime,
    ended: impl Fn(&T) -> bool,
) -> Vec<String> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for path in listing.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let Ok(value) = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
        else {
            continue;
        };
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            continue;
        };
        entries.push(Entry {
            id: id.to_owned(),
            ended: ended(&value),
            modified,
        });
    }
    let mut removed = Vec::new();
    for id in doomed(&entries, policy, now) {
        match std::fs::remove_file(dir.join(format!("{id}.json"))) {
            Ok(()) => removed.push(id),
            Err(e) => tracing::warn!("retention: cannot remove {id} in {}: {e}", dir.display()),
        }
    }
    removed
}

/// Prunes the ended outgoing jobs on file; the ids removed.
pub fn prune_jobs(state_dir: &Path, policy: &Retention, now: SystemTime) -> Vec<String> {
    prune_dir::<JobFile>(&state_dir.join("jobs"), policy, now, |j| j.phase.is_done())
}

/// Prunes the ended incoming migrations on file; the ids removed.
pub fn prune_incoming(state_dir: &Path, policy: &Retention, now: SystemTime) -> Vec<String> {
    prune_dir::<IncomingFile>(&state_dir.join("incoming"), policy, now, |f| {
        f.view.phase != IncomingPhase::Ready
    })
}

impl Agent {
    /// Applies the retention policy to the files, and forgets the pruned
    /// migrations in memory too (only ended ones: the files said so, and
    /// nothing brings an ended one back).
    pub(crate) fn apply_retention(&self) {
        let (state, policy, now) = (
            &self.config.state_dir,
            &self.config.retention,
            SystemTime::now(),
        );
        let jobs = prune_jobs(state, policy, now);
        let incoming = prune_incoming(state, policy, now);
        if jobs.is_empty() && incoming.is_empty() {
            return;
        }
        {
            let mut map = lock(&self.jobs);
            for id in &jobs {
                if map.get(id).is_some_and(|j| lock(&j.view).phase.is_done()) {
                    map.remove(id);
                }
            }
        }
        {
            let mut map = lock(&self.incoming);
            for id in &incoming {
                if map
                    .get(id)
                    .is_some_and(|i| lock(&i.view).phase != IncomingPhase::Ready)
                {
                    map.remove(id);
                }
            }
        }
        tracing::info!(
            "retention (keep {}, max age {} h): pruned {} ended outgoing and {} ended incoming migrations",
            policy.keep,
            policy.max_age_hours,
            jobs.len(),
            incoming.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn entry(id: &str, ended: bool, hours_ago: u64, now: SystemTime) -> Entry {
        Entry {
            id: id.into(),
            ended,
            modified: now - HOUR * hours_ago as u32,
        }
    }

    #[test]
    fn the_newest_ended_are_kept_the_old_go_and_none_in_flight_ever() {
        let now = SystemTime::now();
        let policy = Retention {
            keep: 2,
            max_age_hours: 48,
        };
        let entries = [
            entry("new", true, 1, now),
            entry("newer", true, 0, now),
            entry("third", true, 2, now),
            entry("ancient", true, 100, now),
            // In flight, however old and however many ended ones are newer.
            entry("flying", false, 1000, now),
            entry("flying2", false, 0, now),
        ];
        let mut gone = doomed(&entries, &policy, now);
        gone.sort();
        assert_eq!(gone, ["ancient", "third"]);

        // Under the count, only age decides.
        let roomy = Retention {
            keep: 200,
            max_age_hours: 48,
        };
        assert_eq!(doomed(&entries, &roomy, now), ["ancient"]);
        // keep = 0: every ended one goes, still none in flight.
        let none = Retention {
            keep: 0,
            max_age_hours: 48,
        };
        assert_eq!(doomed(&entries, &none, now).len(), 4);
    }

    #[test]
    fn the_defaults_and_a_bad_age() {
        let d = Retention::default();
        assert_eq!((d.keep, d.max_age_hours), (200, 168));
        assert!(d.check().is_ok());
        assert!(Retention {
            keep: 1,
            max_age_hours: 0
        }
        .check()
        .is_err());
    }

    /// Real job files in a state directory: the ended ones beyond the
    /// policy go, an in-flight one and a file that does not decode stay.
    #[test]
    fn job_files_are_pruned_on_disk() {
        use crate::events::Caller;
        use crate::migration::{JobPhase, MigrationTarget};
        let state = std::env::temp_dir().join(format!("ferry-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let job = |id: &str, phase: JobPhase| JobFile {
            id: id.into(),
            vm: "vm1".into(),
            target: MigrationTarget {
                host: "b".into(),
                address: "127.0.0.1:1".into(),
            },
            destination_migration: "in-1".into(),
            phase,
            transport: String::new(),
            requested_by: Caller::Local {
                uid: 0,
                gid: 0,
                pid: None,
            },
            started_at: String::new(),
            ended_at: None,
            error: None,
            measured: None,
        };
        let now = SystemTime::now();
        for (id, phase, hours_ago) in [
            ("mig-old", JobPhase::Committed, 10u32),
            ("mig-mid", JobPhase::Failed, 2),
            ("mig-new", JobPhase::Cancelled, 1),
            ("mig-flying", JobPhase::Transferring, 500),
        ] {
            crate::jobs::save(&state, &job(id, phase)).unwrap();
            let f = std::fs::File::options()
                .write(true)
                .open(state.join("jobs").join(format!("{id}.json")))
                .unwrap();
            f.set_modified(now - HOUR * hours_ago).unwrap();
        }
        std::fs::write(state.join("jobs").join("garbled.json"), b"{").unwrap();
        std::fs::write(state.join("jobs").join("mig-x.token"), b"secret").unwrap();
        let policy = Retention {
            keep: 2,
            max_age_hours: 5,
        };
        let mut gone = prune_jobs(&state, &policy, now);
        gone.sort();
        assert_eq!(gone, ["mig-old"]);
        let policy = Retention {
            keep: 1,
            max_age_hours: 5,
        };
        assert_eq!(prune_jobs(&state, &policy, now), ["mig-mid"]);
        let mut left: Vec<String> = std::fs::read_dir(state.join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "garbled.json",
                "mig-flying.json",
                "mig-new.json",
                "mig-x.token"
            ]
        );
        assert!(
            prune_incoming(&state, &policy, now).is_empty(),
            "no such directory"
        );
        let _ = std::fs::remove_dir_all(&state);
    }
}
