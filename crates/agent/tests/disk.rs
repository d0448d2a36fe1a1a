//! A VM with a disk on shared storage, owned by agents: `definition.disk`
//! gives the VMM its image, and a migration between two real `ferryd`
//! (mutual TLS control plane, real KVM) hands the image over. On B the
//! guest goes on reading back and checking its disk's blocks against the
//! last writes it saw acknowledged, with no error, and B's VMM holds the
//! image's lock. Refused, changing nothing: a disk workload without a
//! disk, a relative path, an image this host cannot see (at creation and
//! at a destination that does not see it, the VM staying on A).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::peers::{agent, host, migrate_verified, peer_addr, Fleet};
use common::{kvm_or_skip, Agent, TempDir};
use ferry_testguest::console::DiskCounters;
use ferry_vmm::devices::block::lock::{probe, LockState};
use serde_json::{json, Value};

/// 256 blocks the guest writes and checks (plus a spare MiB in the image).
const DISK_MB: u64 = 1;

fn image(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let path = dir.path(name);
    let file = std::fs::File::create(&path).unwrap();
    file.write_all_at(&vec![0u8; ((DISK_MB + 1) << 20) as usize], 0)
        .unwrap();
    path
}

fn create_with_disk(agent: &Agent, id: &str, disk: Value) -> ferry_agent::client::Reply {
    agent.post(
        "/v1/vms",
        Some(json!({"id": id, "definition": {
            "mem_bytes": 256u64 << 20,
            "workload": format!("dirty:32:10+disk:{DISK_MB}:max"),
            "disk": disk,
        }})),
    )
}

/// The disk counters of the last heartbeat in the VM's console log.
fn last_disk(log: &Path) -> Option<DiskCounters> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(DiskCounters::from_heartbeat)
}

/// Waits until the VM (console `log`) checked `blocks` more blocks than
/// `from` did, with no disk error; returns the counters then.
fn wait_checked(log: &Path, from: u64, blocks: u64, timeout: Duration) -> DiskCounters {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(d) = last_disk(log) {
            assert_eq!(d.disk_err, 0, "disk errors in {}: {d:?}", log.display());
            if d.disk_ver >= from + blocks {
                return d;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: fewer than {blocks} blocks checked past {from} within {timeout:?}: {:?}",
            log.display(),
            last_disk(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_vm_with_a_shared_disk_moves_between_agents_and_checks_its_disk_on_b() {
    let test = "a_vm_with_a_shared_disk_moves_between_agents_and_checks_its_disk_on_b";
    if !kvm_or_skip(test) {
        return;
    }
    let fleet = Fleet::new("disk");
    let a = agent("diska", &fleet, "2G", true);
    let b = agent("diskb", &fleet, "2G", true);
    let dir = TempDir::new("disk-images");
    let img = image(&dir, "shared.img");

    // Refusals at creation: nothing is recorded.
    for (disk, status, words) in [
        (Value::Null, 400, "writes a disk"),
        (json!({"path": "relative.img"}), 400, "absolute path"),
        (
            json!({"path": dir.path("missing.img")}),
            422,
            "cannot be seen on host",
        ),
    ] {
        let r = create_with_disk(&a, "refused", disk.clone());
        assert_eq!(r.status, status, "{disk}: {}", r.text());
        assert!(r.text().contains(words), "{disk}: {}", r.text());
        assert_eq!(a.get("/v1/vms/refused").status, 404);
    }

    let r = create_with_disk(&a, "db", json!({"path": img}));
    assert_eq!(r.status, 201, "{}", r.text());
    let on_a = a.show("db");
    let log_a = std::path::PathBuf::from(on_a["log"].as_str().unwrap());
    let before = wait_checked(&log_a, 0, 1, Duration::from_secs(60));
    assert_eq!(
        probe(&img).unwrap(),
        LockState::Held,
        "A's VMM holds the lock"
    );

    // A destination that cannot see the image: 422 before anything moves,
    // and the VM runs on at A (the image is hidden by renaming it; A's VMM
    // keeps its open file).
    let hidden = dir.path("hidden.img");
    std::fs::rename(&img, &hidden).unwrap();
    let r = a.post(
        "/v1/vms/db/migrations",
        Some(json!({"target": {"host": host(&b), "address": peer_addr(&b)}})),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = common::peers::wait_job(&a, &id, Duration::from_secs(60));
    std::fs::rename(&hidden, &img).unwrap();
    assert_eq!(done["phase"], "failed", "{done}");
    let why = done["error"].as_str().unwrap();
    assert!(
        why.contains("422") && why.contains("is the shared storage mounted here"),
        "{why}"
    );
    assert!(done["report"].is_null(), "nothing moved: {done}");
    assert_eq!(a.show("db")["state"], "running");
    assert_eq!(b.get("/v1/vms/db").status, 404);

    let done = migrate_verified(&a, &b, "db");
    eprintln!(
        "{test}: committed, host downtime {} ms",
        done["report"]["blackout"]["host_downtime_ms"]
    );
    let on_b = b.show("db");
    assert_eq!(on_b["definition"]["disk"]["path"], json!(img));
    let log_b = std::path::PathBuf::from(on_b["log"].as_str().unwrap());
    let arrived = wait_checked(&log_b, 0, 1, Duration::from_secs(30));
    let later = wait_checked(
        &log_b,
        arrived.disk_ver,
        DISK_MB << 8,
        Duration::from_secs(90),
    );
    eprintln!("{test}: disk on A {before:?}, on B {arrived:?} then {later:?}");
    assert_eq!(
        probe(&img).unwrap(),
        LockState::Held,
        "B's VMM holds the lock"
    );
    let r = b.delete("/v1/vms/db");
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe(&img).unwrap() == LockState::Held {
        assert!(Instant::now() < deadline, "the lock outlived the VM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A local disk (`definition.disk.local`): the migration copies it into
/// B's state directory, where the VM runs on it; the guest checks a whole
/// round of its blocks there, B holds the copy's lock, and A's image stays
/// where it was, unlocked.
#[test]
fn a_vm_with_a_local_disk_is_copied_between_agents_and_checks_its_disk_on_b() {
    let test = "a_vm_with_a_local_disk_is_copied_between_agents_and_checks_its_disk_on_b";
    if !kvm_or_skip(test) {
        return;
    }
    let fleet = Fleet::new("ldisk");
    let a = agent("ldiska", &fleet, "2G", true);
    let b = agent("ldiskb", &fleet, "2G", true);
    let dir = TempDir::new("ldisk-images");
    let img = image(&dir, "local.img");
    let r = create_with_disk(&a, "app", json!({"path": img, "local": true}));
    assert_eq!(r.status, 201, "{}", r.text());
    let log_a = std::path::PathBuf::from(a.show("app")["log"].as_str().unwrap());
    wait_checked(&log_a, 0, 1, Duration::from_secs(60));

    let done = migrate_verified(&a, &b, "app");
    let copy = &done["report"]["disk_copy"];
    eprintln!(
        "{test}: committed, host downtime {} ms, disk copy {copy}",
        done["report"]["blackout"]["host_downtime_ms"]
    );
    assert!(copy["blocks_sent"].as_u64().unwrap() >= 256, "{done}");
    let on_b = b.show("app");
    let copied = std::path::PathBuf::from(on_b["definition"]["disk"]["path"].as_str().unwrap());
    assert!(
        copied.starts_with(b.dir.path("state")),
        "the copy lives in B's state directory: {}",
        copied.display()
    );
    let log_b = std::path::PathBuf::from(on_b["log"].as_str().unwrap());
    let arrived = wait_checked(&log_b, 0, 1, Duration::from_secs(30));
    wait_checked(
        &log_b,
        arrived.disk_ver,
        DISK_MB << 8,
        Duration::from_secs(90),
    );
    assert_eq!(
        probe(&copied).unwrap(),
        LockState::Held,
        "B runs on its copy"
    );
    assert!(img.exists(), "A's image stays");
    assert_eq!(
        probe(&img).unwrap(),
        LockState::Free,
        "A's VMM let its image go"
    );
    let r = b.delete("/v1/vms/app");
    assert!(r.status == 200 || r.status == 204, "{}", r.text());
}
