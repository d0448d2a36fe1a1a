//! A VM with a disk on shared storage migrates: both hosts see the same
//! image, the source holds its exclusive lock until the pause, drains and
//! flushes the disk and gives the lock up, and the destination takes it
//! before its first vCPU runs. This test process is the third party that
//! watches the lock through /proc for the whole migration: it must never
//! be held by both. On the destination the guest goes on checking every
//! block it reads against the last write it saw acknowledged, and its
//! memory; afterwards the image holds only the guest's own blocks.
//!
//! And the refusals: a destination without the image, with another image,
//! or whose lock is taken by someone else at the hand-over. Each leaves the
//! VM running, verified, on the source, holding its disk.

mod common;

use std::time::{Duration, Instant};

use common::disk::{assert_image_blocks, holds_lock, image, wait_disk, LockWatch};
use common::migrations::{
    assert_committed, destination_holds_nothing, finish_migrate, log_rounds, migrate_failed,
    source_handed_over, source_runs_on_after_failure, stop_destination,
};
use common::{
    kvm_or_skip, migration_destination, migration_destination_with_env, snapshot, start_migrate,
    verify_arrival, FerryProc, TempDir,
};

/// 256 blocks: one checked round takes a few seconds on this host's disk.
const DISK_MB: u64 = 1;

/// `ferry run` with the disk workload on `img`, past its first checked block.
fn disk_source(dir: &TempDir, img: &str) -> (FerryProc, String) {
    common::disk::disk_source(dir, img, DISK_MB)
}

#[test]
fn a_vm_on_shared_storage_moves_and_its_disk_lock_is_handed_over() {
    let test = "a_vm_on_shared_storage_moves_and_its_disk_lock_is_handed_over";
    if !kvm_or_skip(test) {
        return;
    }
    move_on_shared_storage(
        test,
        "disk-precopy",
        &["--mode", "precopy", "--downtime", "10ms"],
    );
}

/// Post-copy: the VM runs on the destination before its memory is all
/// there, so the disk's reads into guest buffers there may land on pages
/// still at the source (they wait for them like the vCPUs do).
#[test]
fn a_vm_on_shared_storage_moves_in_postcopy_with_its_disk() {
    let test = "a_vm_on_shared_storage_moves_in_postcopy_with_its_disk";
    if !kvm_or_skip(test) {
        return;
    }
    let report = move_on_shared_storage(test, "disk-postcopy", &["--mode", "postcopy"]);
    assert_eq!(report["mode"], "postcopy", "{report:#}");
}

/// One move of a disk VM on shared storage with `mode_args`, watched and
/// verified; returns the migration's report.
fn move_on_shared_storage(test: &str, dir: &str, mode_args: &[&str]) -> serde_json::Value {
    let dir = TempDir::new(dir);
    let img = image(&dir, "shared.img", DISK_MB);
    let (mut src, socket) = disk_source(&dir, &img);
    let canonical = std::fs::canonicalize(&img).unwrap();
    assert!(
        holds_lock(src.pid(), &canonical),
        "the running VM holds its image's lock"
    );
    let dst_socket = dir.path("destination.sock");
    let disk = format!("path={img}");
    let (mut dst, port) = migration_destination(
        "destination",
        &[
            "--disk",
            &disk,
            "--api",
            &dst_socket,
            "--duration",
            "300s",
            "--json",
        ],
    );
    let watch = LockWatch::start(&img, src.pid(), dst.pid());
    let mut args = mode_args.to_vec();
    args.push("--json");
    let mut mig = start_migrate("migrate", &socket, port, &args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(90));
    assert_committed(status, &report, &mig);
    log_rounds(test, &report);
    let parts = report["blackout"]["parts"]
        .as_array()
        .expect("blackout parts");
    let storage = parts
        .iter()
        .find(|p| p["name"] == "disk flush + unlock")
        .unwrap_or_else(|| panic!("no disk part in the blackout: {parts:?}"));
    eprintln!("{test}: disk flush + unlock took {} ms", storage["ms"]);
    let last = source_handed_over(&mut src, port);
    let (first, _) = verify_arrival(&mut dst, &last, Duration::from_secs(30));
    assert!(
        holds_lock(dst.pid(), &canonical),
        "the destination holds the lock"
    );
    // On the destination the guest reads back blocks the source wrote and
    // checks them: one more whole checked round, no error.
    let arrived = wait_disk(&mut dst, Duration::from_secs(20), "disk counters", |_| true);
    let round = DISK_MB << 8;
    let later = wait_disk(
        &mut dst,
        Duration::from_secs(90),
        "a checked round on the destination",
        |d| d.disk_ver >= arrived.disk_ver + round,
    );
    eprintln!("{test}: disk on arrival {arrived:?}, after a round {later:?}");
    let timeline = watch.finish();
    eprintln!("{test}: lock timeline {timeline:?}");
    timeline.assert_never_held_twice();
    assert!(
        timeline.polls > 100,
        "the watch barely looked: {timeline:?}"
    );
    let gap = timeline
        .handover_gap()
        .unwrap_or_else(|| panic!("the lock never went from source to destination: {timeline:?}"));
    eprintln!(
        "{test}: lock unheld for {:.3} ms at the hand-over (polls every {:?}; guest's first stall there {} us)",
        gap.as_secs_f64() * 1e3,
        timeline.poll_interval(),
        first.stall_us
    );
    assert!(gap < Duration::from_secs(1), "lock hand-over took {gap:?}");
    stop_destination(&mut dst);
    assert_image_blocks(&img, DISK_MB, later.disk_gen + 1);
    report
}

/// Refusals before any page moves: the destination lacks the image, or is
/// given an image that is not the one the VM runs on.
#[test]
fn a_destination_without_the_vms_image_is_refused_before_any_page_moves() {
    let test = "a_destination_without_the_vms_image_is_refused_before_any_page_moves";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-refused");
    let img = image(&dir, "shared.img", DISK_MB);
    let other = image(&dir, "other.img", DISK_MB);
    let missing = dir.path("missing.img");
    let (mut src, socket) = disk_source(&dir, &img);
    let canonical = std::fs::canonicalize(&img).unwrap();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (vec![], &["has a disk", "--disk path=IMG"]),
        (
            vec!["--disk".into(), format!("path={missing}")],
            &["missing.img", "does not exist"],
        ),
        (
            vec!["--disk".into(), format!("path={other}")],
            &["nobody holds the lock", "other.img"],
        ),
        (
            vec!["--disk".into(), format!("path={img},readonly")],
            &["writable on the source", "read-only here"],
        ),
    ];
    for (args, words) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut dst, port) = migration_destination("destination", &args);
        let t0 = Instant::now();
        let mut mig = start_migrate("migrate", &socket, port, &["--json"]);
        let reason = migrate_failed(&mut mig, Duration::from_secs(30));
        eprintln!("{test}: {args:?}: {reason}");
        for w in words {
            assert!(reason.contains(w), "{args:?}: {reason:?} lacks {w:?}");
        }
        let report = mig.json_report();
        assert_eq!(report["pages_sent"], 0, "pages moved: {report:#}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        destination_holds_nothing(&mut dst, false);
        source_runs_on_after_failure(&mut src, port);
        assert!(
            holds_lock(src.pid(), &canonical),
            "the source kept its lock"
        );
    }
    // The refused images were never written.
    assert!(std::fs::read(&other).unwrap().iter().all(|&b| b == 0xa5));
    wait_disk(&mut src, Duration::from_secs(10), "disk counters", |_| true);
}

/// Someone else takes the lock the moment the source gives it up: the
/// destination cannot take it, the move aborts, and the source waits for
/// the lock, takes it back and resumes, its disk and memory intact.
#[test]
fn a_lock_the_destination_cannot_take_aborts_and_the_source_takes_its_disk_back() {
    let test = "a_lock_the_destination_cannot_take_aborts_and_the_source_takes_its_disk_back";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-thief");
    let img = image(&dir, "shared.img", DISK_MB);
    let (mut src, socket) = disk_source(&dir, &img);
    let canonical = std::fs::canonicalize(&img).unwrap();
    let disk = format!("path={img}");
    // The destination waits 500 ms before it takes the lock: the thief,
    // spinning on it, wins the lock in that window however busy the
    // machine is (without the wait it had microseconds, and lost the race
    // under load).
    let (mut dst, port) = migration_destination_with_env(
        "destination",
        &["--disk", &disk],
        &[("FERRY_TEST_DISK_LOCK_DELAY_MS", "500")],
    );
    // The thief: spins on a lock attempt from before the migration starts
    // until it wins (at the source's release), holds it for a while, and
    // lets go. Bounded by a deadline.
    let thief_img = img.clone();
    let thief = std::thread::spawn(move || {
        let path = std::path::Path::new(&thief_img);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ferry_vmm::devices::block::lock::take(&file, path).is_ok() {
                let won = Instant::now();
                std::thread::sleep(Duration::from_secs(2));
                ferry_vmm::devices::block::lock::release(&file, path).unwrap();
                return Some(won);
            }
            std::hint::spin_loop();
        }
        None
    });
    let mut mig = start_migrate("migrate", &socket, port, &["--mode", "precopy", "--json"]);
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: {reason}");
    assert!(
        thief.join().unwrap().is_some(),
        "the thief never got the lock"
    );
    assert!(
        reason.contains("locked by another process"),
        "the reason must say the lock was held: {reason}"
    );
    destination_holds_nothing(&mut dst, false);
    source_runs_on_after_failure(&mut src, port);
    assert!(
        holds_lock(src.pid(), &canonical),
        "the source took its lock back"
    );
    let after = wait_disk(&mut src, Duration::from_secs(10), "disk counters", |_| true);
    let round = DISK_MB << 8;
    wait_disk(
        &mut src,
        Duration::from_secs(90),
        "a checked round after the abort",
        |d| d.disk_ver >= after.disk_ver + round,
    );
}

/// A snapshot carries the disk's device: it is taken only with `--stop`
/// (a VM that ran on would leave the image ahead of the snapshot), and
/// restored only onto its image, where the guest goes on checking every
/// block against the writes it saw acknowledged before the snapshot.
#[test]
fn a_disk_vm_is_snapshotted_with_stop_and_restored_onto_its_image() {
    let test = "a_disk_vm_is_snapshotted_with_stop_and_restored_onto_its_image";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-snap");
    let img = image(&dir, "shared.img", DISK_MB);
    let (mut src, socket) = disk_source(&dir, &img);
    let file = dir.path("vm.snap");
    let out = snapshot(&socket, &file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a live snapshot of a disk VM: {stderr}"
    );
    assert!(stderr.contains("--stop"), "{stderr}");
    assert!(
        !std::path::Path::new(&file).exists(),
        "a refused snapshot left a file"
    );
    // Refused without a pause: the VM runs on, checking its disk.
    let before = wait_disk(&mut src, Duration::from_secs(10), "disk counters", |_| true);
    let out = snapshot(&socket, &file, &["--stop"]);
    assert!(
        out.status.success(),
        "ferry snapshot --stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    src.wait_exit(Duration::from_secs(20));
    let last = src.heartbeats().last().cloned().expect("heartbeats");
    assert!(last.err == 0 && before.disk_err == 0);

    let out = common::ferry()
        .args(["restore", &file, "--duration", "2s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored without its disk: {stderr}");
    assert!(stderr.contains("--disk path=IMG"), "{stderr}");

    let disk = format!("path={img}");
    let mut vm = FerryProc::spawn(
        "restored",
        &["restore", &file, "--disk", &disk, "--duration", "120s"],
    );
    let first = vm.next_heartbeat(Duration::from_secs(20));
    assert_eq!(first.seq, last.seq + 1, "the restored guest continues");
    let arrived = wait_disk(&mut vm, Duration::from_secs(10), "disk counters", |_| true);
    let round = DISK_MB << 8;
    let later = wait_disk(
        &mut vm,
        Duration::from_secs(90),
        "a checked round after the restore",
        |d| d.disk_ver >= arrived.disk_ver + round,
    );
    eprintln!("{test}: restored: {arrived:?} then {later:?}");
    let hbs = vm.heartbeats();
    assert!(
        hbs.iter().all(|h| h.err == 0),
        "memory errors after restore"
    );
    vm.kill();
}
