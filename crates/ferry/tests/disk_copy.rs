//! A VM with a local disk migrates with `--copy-storage`: the image is
//! copied while the guest keeps writing it, the blocks it writes behind
//! the copy go again in later rounds, the last ones in the blackout, and
//! the destination runs the VM on its own new image. The guest goes on
//! checking every block it reads there against the last write it saw
//! acknowledged (a lost or stale block fails it), and its memory.
//!
//! And what must change nothing: a destination that cannot make the image
//! (a file already there, no path, no directory, no room), a mode that
//! could run the VM before its last blocks arrived, an operator's cancel
//! mid-copy (the partial image is deleted) and a destination killed
//! mid-copy. Each leaves the VM running, verified, on the source, on its
//! own image and holding its lock.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::disk::{
    assert_image_blocks, disk_source, disk_source_with, holds_lock, image, wait_disk,
};
use common::migrations::{
    assert_committed, destination_holds_nothing, finish_migrate, log_rounds, migrate_failed,
    source_handed_over, source_runs_on_after_failure, stop_destination,
};
use common::{kvm_or_skip, migration_destination, start_migrate, verify_arrival, TempDir};
use ferry_testguest::console::DiskCounters;
use ferry_vmm::devices::block::copy_hold::LONGEST_HOLD;
use ferry_vmm::devices::block::copy_target::marker_path;

/// 256 checked blocks (and the image's spare MiB): one checked round takes
/// a few seconds on this host's disk.
const DISK_MB: u64 = 1;
/// Blocks in a whole checked round of the guest's disk.
const ROUND: u64 = DISK_MB << 8;

#[test]
fn a_local_disk_is_copied_with_the_vm_and_every_acknowledged_write_arrives() {
    let test = "a_local_disk_is_copied_with_the_vm_and_every_acknowledged_write_arrives";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-copy");
    let img = image(&dir, "local.img", DISK_MB);
    let (mut src, socket) = disk_source(&dir, &img, DISK_MB);
    let copy = dir.path("copied.img");
    // The first pass on two streams: the disk's pages are striped across
    // them like memory's.
    let (mut dst, port, report) = copy_committed(test, &dir, &socket, &copy, &["--streams", "2"]);
    let d = &report["disk_copy"];
    let image_blocks = (DISK_MB + 1) << 8;
    assert_eq!(d["image_bytes"], image_blocks * 4096, "{d}");
    // The test's image is written all over: the first pass reads it all.
    assert_eq!(d["first_pass_blocks"], image_blocks, "{d}");
    let sent = d["blocks_sent"].as_u64().unwrap();
    assert!(
        sent >= image_blocks,
        "fewer blocks sent than the image: {d}"
    );
    let later = runs_on_its_copy(test, &mut src, &mut dst, port, &copy);
    stop_destination(&mut dst);
    // The copy holds the guest's blocks, and the source's spare MiB as it
    // was there (copied, not zeroed).
    assert_image_blocks(&copy, DISK_MB, later.disk_gen + 1);
    assert!(Path::new(&img).exists(), "the source's image stays");
}

/// The guest rewrites its disk as fast as it can (about 3 MiB/s here)
/// over a link capped at 2 MiB/s: the 1 MiB it cycles through is dirty
/// again before a round ends, so without write-blocking the rounds never
/// shrink (the round limit forced a blackout of over 1 s, 42 rounds). The copy switches to write-blocking (each write completes once
/// its block is sent), the rounds shrink to what the guest can write in
/// one, and the migration converges within its target without braking
/// the vCPU; every acknowledged write arrives.
#[test]
fn a_guest_that_outwrites_a_capped_link_converges_through_write_blocking() {
    let test = "a_guest_that_outwrites_a_capped_link_converges_through_write_blocking";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-write-blocking");
    let img = image(&dir, "local.img", DISK_MB);
    // A little memory written too (1 MiB/s), for the guest to verify.
    let workload = format!("dirty:2:1+disk:{DISK_MB}:max");
    let (mut src, socket) = disk_source_with(&dir, &img, "64M", &workload);
    let copy = dir.path("copied.img");
    // 50 ms are 25 pages at this rate: what the guest's memory alone
    // dirties in a round, which the brake, kept off here, would not help.
    let extra = [
        "--bandwidth",
        "2MiB/s",
        "--no-auto-converge",
        "--downtime",
        "50ms",
    ];
    let (mut dst, port, report) = copy_committed(test, &dir, &socket, &copy, &extra);
    let d = &report["disk_copy"];
    assert!(
        d["write_blocking_ms"].as_f64().unwrap() > 0.0 && d["writes_held"].as_u64().unwrap() > 0,
        "the copy never switched to write-blocking: {d}"
    );
    assert_eq!(
        d["writes_released_unsent"], 0,
        "a held write was let through before the copy sent it: {d}"
    );
    // Every held write was let go by the copy, not by the hold's limit.
    let limit_ms = LONGEST_HOLD.as_secs_f64() * 1e3;
    assert!(d["longest_hold_ms"].as_f64().unwrap() < limit_ms, "{d}");
    assert!(
        report["max_throttle_percent"].as_u64().unwrap_or(0) == 0,
        "the vCPU was braked: {report}"
    );
    let blackout = &report["blackout"];
    eprintln!("{test}: blackout {blackout}");
    // Converged: the switchover was chosen, not forced by the round limit.
    assert_eq!(blackout["forced"], false, "{blackout}");
    let later = runs_on_its_copy(test, &mut src, &mut dst, port, &copy);
    stop_destination(&mut dst);
    assert_image_blocks(&copy, DISK_MB, later.disk_gen + 1);
}

/// A destination that receives the disk into `copy`, and a pre-copy of
/// `socket`'s VM to it with `--copy-storage` and `extra`, committed: the
/// destination, its port and the report.
fn copy_committed(
    test: &str,
    dir: &TempDir,
    socket: &str,
    copy: &str,
    extra: &[&str],
) -> (common::FerryProc, u16, serde_json::Value) {
    static DESTINATIONS: AtomicUsize = AtomicUsize::new(0);
    let n = DESTINATIONS.fetch_add(1, Ordering::Relaxed);
    let dst_socket = dir.path(&format!("destination-{n}.sock"));
    let disk = format!("path={copy}");
    let (dst, port) = migration_destination(
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
    let mut args = vec!["--mode", "precopy", "--copy-storage", "--json"];
    if !extra.contains(&"--downtime") {
        args.extend(["--downtime", "10ms"]);
    }
    args.extend_from_slice(extra);
    let mut mig = start_migrate("migrate", socket, port, &args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(90));
    assert_committed(status, &report, &mig);
    log_rounds(test, &report);
    eprintln!(
        "{test}: disk copy {}; host downtime {} ms",
        report["disk_copy"], report["blackout"]["host_downtime_ms"]
    );
    (dst, port, report)
}

/// The VM handed over by `src` runs on `dst`, its memory verified by the
/// guest, on its copy at `copy` (holding its lock, no longer marked
/// incomplete), and reads back and checks a whole round of its disk
/// there: the counters after that round.
fn runs_on_its_copy(
    test: &str,
    src: &mut common::FerryProc,
    dst: &mut common::FerryProc,
    port: u16,
    copy: &str,
) -> DiskCounters {
    let last = source_handed_over(src, port);
    let (first, _) = verify_arrival(dst, &last, Duration::from_secs(30));
    eprintln!("{test}: guest's stall at the move {} us", first.stall_us);
    let canonical = std::fs::canonicalize(copy).unwrap();
    assert!(
        holds_lock(dst.pid(), &canonical),
        "the destination runs on its copy, holding its lock"
    );
    assert!(
        !marker_path(Path::new(copy)).exists(),
        "a complete copy is unmarked"
    );
    // On the destination the guest reads back every block it wrote on the
    // source and checks it: a whole checked round, no error.
    let arrived = wait_disk(dst, Duration::from_secs(20), "disk counters", |_| true);
    let later = wait_disk(
        dst,
        Duration::from_secs(90),
        "a checked round on the destination",
        |d| d.disk_ver >= arrived.disk_ver + ROUND,
    );
    eprintln!("{test}: disk on arrival {arrived:?}, after a round {later:?}");
    later
}

/// Refusals before any page moves, each leaving nothing on the
/// destination and the VM running, verified, on the source.
#[test]
fn a_disk_copy_that_cannot_be_made_is_refused_before_any_page_moves() {
    let test = "a_disk_copy_that_cannot_be_made_is_refused_before_any_page_moves";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-copy-refused");
    let img = image(&dir, "local.img", DISK_MB);
    let there = image(&dir, "there.img", DISK_MB);
    let (mut src, socket) = disk_source(&dir, &img, DISK_MB);
    let canonical = std::fs::canonicalize(&img).unwrap();
    let no_dir = dir.path("no-such-dir/copy.img");
    let full = SmallFilesystem::mount(&dir, "small-fs", 1 << 20);
    let copy_here = format!("path={}", dir.path("copy.img"));
    let mut cases = vec![
        Refusal::at_destination(
            &["--disk", &format!("path={there}")],
            &["exists here already", "there.img"],
        ),
        Refusal::at_destination(&[], &["copies the VM's disk", "--disk path=IMG"]),
        Refusal::at_destination(
            &["--disk", &format!("path={no_dir}")],
            &["is not a directory"],
        ),
        Refusal::at_source(
            &["--disk", &copy_here],
            &["--mode", "postcopy"],
            &["pre-copy only", "--mode postcopy"],
        ),
        Refusal::at_source(
            &["--disk", &copy_here],
            &["--mode", "hybrid"],
            &["pre-copy only", "--mode hybrid"],
        ),
    ];
    match &full {
        Some(fs) => cases.push(Refusal::at_destination(
            &["--disk", &format!("path={}", fs.path("copy.img"))],
            &["no room", "nothing was copied"],
        )),
        None => {
            eprintln!("{test}: SKIPPED the full-filesystem case: mounting a small tmpfs needs root")
        }
    }
    for case in cases {
        let Refusal {
            dst_args,
            mig_args,
            words,
            refused_here,
        } = case;
        let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
        let (mut dst, port) = migration_destination("destination", &dst_args);
        let t0 = Instant::now();
        let mut args: Vec<&str> = vec!["--copy-storage", "--json"];
        args.extend(mig_args.iter().map(String::as_str));
        let mut mig = start_migrate("migrate", &socket, port, &args);
        let reason = migrate_failed(&mut mig, Duration::from_secs(30));
        eprintln!("{test}: {dst_args:?} {mig_args:?}: {reason}");
        for w in &words {
            assert!(
                reason.contains(w.as_str()),
                "{dst_args:?}: {reason:?} lacks {w:?}"
            );
        }
        let report = mig.json_report();
        assert_eq!(report["pages_sent"], 0, "pages moved: {report:#}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // A refusal on the source never reached the destination, which
        // waits on: stop it. One on the destination ended it.
        destination_holds_nothing(&mut dst, refused_here);
        source_runs_on_after_failure(&mut src, port);
        assert!(
            holds_lock(src.pid(), &canonical),
            "the source kept its lock"
        );
        assert!(
            !Path::new(&dir.path("copy.img")).exists() && !Path::new(&no_dir).exists(),
            "a refused copy left an image"
        );
    }
    if let Some(fs) = &full {
        assert!(
            !Path::new(&fs.path("copy.img")).exists(),
            "the full filesystem kept a partial image"
        );
    }
    // The file that was there was never written.
    assert!(std::fs::read(&there).unwrap().iter().all(|&b| b == 0xa5));
    let after = wait_disk(&mut src, Duration::from_secs(10), "disk counters", |_| true);
    wait_disk(
        &mut src,
        Duration::from_secs(90),
        "a checked round after the refusals",
        |d| d.disk_ver >= after.disk_ver + ROUND,
    );
}

/// A copy the test expects to be refused, and by whom.
struct Refusal {
    dst_args: Vec<String>,
    /// Beside `--copy-storage --json`.
    mig_args: Vec<String>,
    /// Words the reason must hold.
    words: Vec<String>,
    /// Refused by the source before it connects: the destination never
    /// hears of it and waits on.
    refused_here: bool,
}

impl Refusal {
    fn at_destination(dst_args: &[&str], words: &[&str]) -> Refusal {
        Refusal::new(dst_args, &[], words, false)
    }

    fn at_source(dst_args: &[&str], mig_args: &[&str], words: &[&str]) -> Refusal {
        Refusal::new(dst_args, mig_args, words, true)
    }

    fn new(dst_args: &[&str], mig_args: &[&str], words: &[&str], refused_here: bool) -> Refusal {
        let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
        Refusal {
            dst_args: owned(dst_args),
            mig_args: owned(mig_args),
            words: owned(words),
            refused_here,
        }
    }
}

/// An operator cancels while the disk is being copied: the destination
/// deletes its partial image, and the VM runs on, verified, on its own.
#[test]
fn a_cancelled_disk_copy_deletes_the_partial_image_and_the_source_runs_on() {
    let test = "a_cancelled_disk_copy_deletes_the_partial_image_and_the_source_runs_on";
    if !kvm_or_skip(test) {
        return;
    }
    let SlowCopy {
        _dir,
        img,
        copy,
        mut src,
        socket,
        mut dst,
        port,
        mut mig,
    } = SlowCopy::start("disk-copy-cancel");
    assert_eq!(
        api_call(&socket, r#"{"command":"cancel_migration"}"#)["migrating"],
        true
    );
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: {reason}");
    assert!(reason.contains("cancel"), "{reason}");
    destination_holds_nothing(&mut dst, false);
    assert!(
        !Path::new(&copy).exists(),
        "the partial image was not deleted"
    );
    assert!(
        dst.err
            .iter()
            .any(|l| l == &format!("ferry: no disk image is left at {copy}")),
        "the destination must say its partial image is gone\n{}",
        dst.transcript()
    );
    source_runs_on_after_failure(&mut src, port);
    source_checks_a_round_on_its_own_image(&mut src, &img);
}

/// The destination dies mid-copy (SIGKILL): the VM runs on, verified, on
/// its own image. A killed process cannot delete its partial image, but it
/// left it marked incomplete: the next copy to that path replaces it, and
/// the VM arrives there whole. (An unmarked file there is never written
/// over: see the refusals above.)
#[test]
fn a_destination_killed_mid_copy_leaves_the_source_running_on_its_image() {
    let test = "a_destination_killed_mid_copy_leaves_the_source_running_on_its_image";
    if !kvm_or_skip(test) {
        return;
    }
    let SlowCopy {
        _dir,
        img,
        copy,
        mut src,
        socket,
        port,
        mut dst,
        mut mig,
    } = SlowCopy::start("disk-copy-killed");
    destination_holds_nothing(&mut dst, true);
    let reason = migrate_failed(&mut mig, Duration::from_secs(60));
    eprintln!("{test}: {reason}");
    source_runs_on_after_failure(&mut src, port);
    source_checks_a_round_on_its_own_image(&mut src, &img);
    assert!(
        Path::new(&copy).exists() && marker_path(Path::new(&copy)).exists(),
        "the killed receiver's partial image is left, marked incomplete"
    );
    let (mut again, port, _) = copy_committed(test, &_dir, &socket, &copy, &[]);
    runs_on_its_copy(test, &mut src, &mut again, port, &copy);
    stop_destination(&mut again);
}

/// A disk VM whose copy runs slowly enough to be interrupted: the
/// destination has made its image and the first pass is under way (the
/// engine looks at a cancel at the end of that round).
struct SlowCopy {
    _dir: TempDir,
    img: String,
    copy: String,
    src: common::FerryProc,
    socket: String,
    dst: common::FerryProc,
    port: u16,
    mig: common::FerryProc,
}

impl SlowCopy {
    fn start(tag: &str) -> SlowCopy {
        let dir = TempDir::new(tag);
        let img = image(&dir, "local.img", DISK_MB);
        let (src, socket) = disk_source(&dir, &img, DISK_MB);
        let copy = dir.path("copied.img");
        let disk = format!("path={copy}");
        let (dst, port) = migration_destination("destination", &["--disk", &disk]);
        let mig = start_migrate(
            "migrate",
            &socket,
            port,
            &["--copy-storage", "--bandwidth", "20MiB/s", "--json"],
        );
        wait_for_path(&copy, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(500));
        SlowCopy {
            _dir: dir,
            img,
            copy,
            src,
            socket,
            dst,
            port,
            mig,
        }
    }
}

/// The source holds its own image's lock and checks a whole round of its
/// disk, without an error.
fn source_checks_a_round_on_its_own_image(src: &mut common::FerryProc, img: &str) {
    let canonical = std::fs::canonicalize(img).unwrap();
    assert!(
        holds_lock(src.pid(), &canonical),
        "the source holds its image's lock"
    );
    let after = wait_disk(src, Duration::from_secs(10), "disk counters", |_| true);
    wait_disk(
        src,
        Duration::from_secs(90),
        "a checked round on the source after the failed move",
        |d| d.disk_ver >= after.disk_ver + ROUND,
    );
}

fn wait_for_path(path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !Path::new(path).exists() {
        assert!(Instant::now() < deadline, "{path} never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One request to a VM's API socket; its JSON answer.
fn api_call(socket: &str, request: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    writeln!(stream, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{request}: {line:?}: {e}"))
}

/// A tmpfs of a few bytes mounted for the test (root only), unmounted when
/// dropped, also when the test fails.
struct SmallFilesystem {
    dir: String,
}

impl SmallFilesystem {
    fn mount(parent: &TempDir, name: &str, bytes: u64) -> Option<SmallFilesystem> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = parent.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", &dir])
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs {dir}: {status}");
        Some(SmallFilesystem { dir })
    }

    fn path(&self, file: &str) -> String {
        format!("{}/{file}", self.dir)
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}
