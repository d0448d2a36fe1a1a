//! The `[retention]` policy on real agents: ended migrations on file
//! beyond `keep`, or older than `max_age_hours`, are pruned when ferryd
//! starts and again when a migration ends (outgoing jobs on the source,
//! incoming migrations on the destination); the one that just ended
//! stays, being the newest.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::peers::{migrate_verified, Fleet};
use common::{kvm_or_skip, Agent};
use ferry_agent::events::Caller;
use ferry_agent::incoming::IncomingFile;
use ferry_agent::jobs::JobFile;
use ferry_agent::migration::{IncomingPhase, IncomingView, JobPhase, MigrationTarget, PeerOffer};
use ferry_agent::model::{MigrationPolicy, VmDefinition};

const RETENTION: &str = "[retention]\nkeep = 1\nmax_age_hours = 1\n";

fn age(path: &Path, minutes: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(60 * minutes))
        .unwrap();
}

/// Ended outgoing jobs written `minutes` ago.
fn seed_jobs(state: &Path, jobs: &[(&str, u64)]) {
    for (id, minutes) in jobs {
        let file = JobFile {
            id: (*id).into(),
            vm: "old-vm".into(),
            target: MigrationTarget {
                host: "test-elsewhere".into(),
                address: "127.0.0.1:9".into(),
            },
            destination_migration: "in-00000000".into(),
            phase: JobPhase::Committed,
            transport: String::new(),
            requested_by: Caller::Local {
                uid: 0,
                gid: 0,
                pid: None,
            },
            started_at: "2026-12-01T00:00:00.000Z".into(),
            ended_at: Some("2026-12-01T00:00:01.000Z".into()),
            error: None,
            measured: None,
        };
        ferry_agent::jobs::save(state, &file).unwrap();
        age(&state.join("jobs").join(format!("{id}.json")), *minutes);
    }
}

/// Ended incoming migrations written `minutes` ago.
fn seed_incoming(state: &Path, incoming: &[(&str, u64)]) {
    for (id, minutes) in incoming {
        let definition = VmDefinition {
            mem_bytes: 64 << 20,
            vcpus: 1,
            workload: "idle".into(),
            guest: None,
            prealloc: false,
            net: None,
            disk: None,
        };
        let file = IncomingFile {
            view: IncomingView {
                id: (*id).into(),
                vm: "old-vm".into(),
                job: "mig-00000000".into(),
                source: Some("test-elsewhere".into()),
                phase: IncomingPhase::Aborted,
                address: String::new(),
                mem_bytes: 64 << 20,
                reason: Some("the source aborted it".into()),
                created_at: "2026-12-01T00:00:00.000Z".into(),
            },
            offer: PeerOffer {
                job: "mig-00000000".into(),
                vm: "old-vm".into(),
                definition,
                policy: MigrationPolicy::default(),
                plaintext_data_plane: true,
            },
            receiver: None,
            tap: None,
            answered: true,
            log_offset: 0,
            expires_at_ms: 0,
            offered_at_ms: 0,
            prepare_ms: None,
            measured: None,
        };
        ferry_agent::incoming::save(state, &file).unwrap();
        age(&state.join("incoming").join(format!("{id}.json")), *minutes);
    }
}

/// The `*.json` names in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits (bounded) until `dir` holds exactly `want`.
fn wait_files(dir: &Path, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = files(dir);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {now:?}, wanted {want:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn peer(name: &str, fleet: &Fleet, seed: impl FnOnce(&Path)) -> Agent {
    let id = fleet.issue(&format!("test-{name}"));
    let extra = format!(
        "tls_dir = \"{}\"\ninsecure_plaintext_data_plane = true\n{RETENTION}",
        id.display()
    );
    Agent::with_extra(name, "2G", 4, None, &extra, |dir| seed(&dir.join("state")))
}

#[test]
fn ended_migrations_beyond_the_policy_are_pruned_at_start_and_after_each_end() {
    if !kvm_or_skip("ended_migrations_beyond_the_policy_are_pruned") {
        return;
    }
    let fleet = Fleet::new("keep");
    // Two hours old: past max_age. Twenty minutes: beyond keep = 1.
    let a = peer("keep-a", &fleet, |state| {
        seed_jobs(
            state,
            &[
                ("mig-aaaaaaa1", 120),
                ("mig-aaaaaaa2", 20),
                ("mig-aaaaaaa3", 5),
            ],
        )
    });
    let b = peer("keep-b", &fleet, |state| {
        seed_incoming(
            state,
            &[
                ("in-bbbbbbb1", 120),
                ("in-bbbbbbb2", 20),
                ("in-bbbbbbb3", 5),
            ],
        )
    });
    let (a_jobs, b_incoming) = (
        a.dir.path("state").join("jobs"),
        b.dir.path("state").join("incoming"),
    );
    assert_eq!(files(&a_jobs), ["mig-aaaaaaa3.json"], "at start");
    assert_eq!(files(&b_incoming), ["in-bbbbbbb3.json"], "at start");

    a.create_vm("vm1", "128M", "dirty:8:10");
    let done = migrate_verified(&a, &b, "vm1");
    let job = done["id"].as_str().unwrap().to_owned();
    let incoming = done["destination_migration"].as_str().unwrap().to_owned();
    // The newest ended one stays; the one it displaced goes.
    wait_files(&a_jobs, &[format!("{job}.json")]);
    wait_files(&b_incoming, &[format!("{incoming}.json")]);
    assert_eq!(a.get(&format!("/v1/migrations/{job}")).status, 200);
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}
