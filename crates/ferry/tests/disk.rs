//! The guest's disk workload on Ferry's own virtio-blk device: `ferry run
//! --disk path=IMG` puts the image in virtio-mmio slot 1, the real guest
//! finds it, writes generation-tagged blocks and checks every block it
//! reads back against the last write it saw acknowledged, while its dirty
//! workload verifies memory. The image's lock keeps a second VM off it,
//! and bad disk flags are refused before any VM starts.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::disk::{assert_image_blocks, image};
use common::{ferry, kvm_or_skip, RunningFerry, TempDir};
use ferry_testguest::console::{DiskCounters, DiskUp, Line};

/// 1024 blocks: a checked round takes some 30 s here (each O_DIRECT write
/// to this host's virtual disk costs milliseconds).
const DISK_MB: u64 = 4;

#[test]
fn the_disk_workload_runs_on_ferrys_virtio_blk() {
    let test = "the_disk_workload_runs_on_ferrys_virtio_blk";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-run");
    let img = image(&dir, "disk.img", DISK_MB);
    let disk = format!("path={img}");
    let workload = format!("dirty:64:10+disk:{DISK_MB}:max");
    let mut vm = RunningFerry::spawn(&[
        "--mem",
        "512M",
        "--workload",
        &workload,
        "--disk",
        &disk,
        "--duration",
        "120s",
    ]);
    let blocks = DISK_MB << 8;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut up = None;
    let mut last = DiskCounters::default();
    while last.disk_ver < blocks {
        let left = deadline.saturating_duration_since(Instant::now());
        let (text, line) = vm.lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "no full checked round within 90 s (last {last:?}); console:\n{}",
                vm.seen.join("\n")
            )
        });
        vm.seen.push(text.clone());
        if let Some(d) = DiskUp::parse(&text) {
            up = Some(d);
        }
        assert!(
            !text.starts_with("DERR"),
            "{text}; console:\n{}",
            vm.seen.join("\n")
        );
        match line {
            Line::Heartbeat(hb) => {
                assert_eq!(hb.err, 0, "bad memory pages: {text}");
                last = DiskCounters::from_heartbeat(&text)
                    .unwrap_or_else(|| panic!("HB without disk fields: {text}"));
                assert_eq!(last.disk_err, 0, "{text}; console:\n{}", vm.seen.join("\n"));
            }
            Line::Exit(_) | Line::PageError(_) => {
                panic!("unexpected {text}; console:\n{}", vm.seen.join("\n"))
            }
            _ => {}
        }
    }
    let up = up.expect("a DISK line before the first checked round");
    eprintln!("{up:?}; disk after a checked round: {last:?}");
    assert_eq!(
        (up.slot, up.addr, up.version),
        (1, 0xfeb0_0200, 2),
        "{up:?}"
    );
    assert_eq!(up.capacity_sectors, ((DISK_MB + 1) << 20) / 512);
    assert!(up.flush, "Ferry's disk offers FLUSH");
    assert!(last.disk_wr >= blocks + last.disk_ver - 1, "{last:?}");

    // While it runs, a second VM on the same image is refused at once.
    let t0 = Instant::now();
    let out = ferry()
        .args(["run", "--mem", "256M", "--disk", &disk, "--duration", "2s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second VM got the disk: {stderr}");
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(5));

    let (status, _) = vm.stop();
    assert!(status.success(), "ferry run: {status}");
    // What the guest wrote is in the image: every block holds its own
    // number and a generation of this run; the spare MiB is untouched.
    assert_image_blocks(&img, DISK_MB, last.disk_gen + 1);
}

/// `ferry run ARGS`, which must fail at once; returns its stderr.
fn refused(args: &[&str]) -> String {
    let t0 = Instant::now();
    let out = ferry()
        .arg("run")
        .args(args)
        .args(["--duration", "2s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{args:?} must fail: {stderr}");
    assert!(!stdout.contains("HB seq="), "{args:?} booted a guest");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{args:?} must fail fast"
    );
    stderr
}

#[test]
fn bad_disks_are_refused_before_the_vm_starts() {
    let test = "bad_disks_are_refused_before_the_vm_starts";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-bad");
    let img = image(&dir, "disk.img", 1);
    let missing = dir.path("missing.img");
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            vec!["--disk".into(), format!("path={missing}")],
            &["missing.img", "does not exist"],
        ),
        (vec!["--disk".into(), "readonly".into()], &["path=IMG"]),
        (
            vec!["--disk".into(), format!("path={img},cache=none")],
            &["cache=none"],
        ),
        (
            vec!["--workload".into(), "disk:1:10".into()],
            &["writes a disk", "--disk path=IMG"],
        ),
        (
            vec![
                "--workload".into(),
                "disk:8:10".into(),
                "--disk".into(),
                format!("path={img}"),
            ],
            &["needs 8"],
        ),
        (
            vec![
                "--workload".into(),
                "disk:1:10".into(),
                "--disk".into(),
                format!("path={img},readonly"),
            ],
            &["readonly"],
        ),
        (
            vec!["--workload".into(), "disk:0:10".into()],
            &["disk term", "1 to 256"],
        ),
    ];
    for (args, words) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = refused(&args);
        for w in words {
            assert!(stderr.contains(w), "{args:?}: {stderr:?} lacks {w:?}");
        }
    }
    // Nothing was written to the image.
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0xa5));
}

/// Reads the console until `until` holds for the disk counters of a
/// heartbeat; every line goes through `each` first.
fn watch_disk(
    vm: &mut RunningFerry,
    timeout: Duration,
    mut each: impl FnMut(&str),
    until: impl Fn(&DiskCounters) -> bool,
) -> DiskCounters {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (text, line) = vm.lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "timed out after {timeout:?}; console:\n{}",
                vm.seen.join("\n")
            )
        });
        vm.seen.push(text.clone());
        each(&text);
        if let Line::Heartbeat(_) = line {
            if let Some(d) = DiskCounters::from_heartbeat(&text) {
                if until(&d) {
                    return d;
                }
            }
        }
    }
}

#[test]
fn a_block_changed_behind_the_guest_is_caught_on_ferrys_disk() {
    let test = "a_block_changed_behind_the_guest_is_caught_on_ferrys_disk";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("disk-corrupt");
    let img = image(&dir, "disk.img", 1);
    let disk = format!("path={img}");
    let mut vm = RunningFerry::spawn(&[
        "--mem",
        "256M",
        "--workload",
        "disk:1:max",
        "--disk",
        &disk,
        "--duration",
        "90s",
    ]);
    // Once checks have begun, every block was acknowledged at least once.
    watch_disk(
        &mut vm,
        Duration::from_secs(40),
        |_| {},
        |d| {
            assert_eq!(d.disk_err, 0, "{d:?}");
            d.disk_ver > 0
        },
    );
    // Overwrite the middle of every 16th block through the host file: the
    // device reads with O_DIRECT, so the guest's next read sees it.
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for b in (0..256u64).step_by(16) {
        file.write_all_at(&[0xee; 64], b * 4096 + 2048).unwrap();
    }
    file.sync_data().unwrap();
    let mut derr = Vec::new();
    let last = watch_disk(
        &mut vm,
        Duration::from_secs(40),
        |t| {
            if t.starts_with("DERR") {
                derr.push(t.to_owned());
            }
        },
        // The block in flight may be rewritten before it is read.
        |d| d.disk_err >= 15,
    );
    eprintln!("after the corruption: {last:?}; {derr:?}");
    assert!(
        derr.iter().any(|l| l.contains("kind=corrupt")),
        "no DERR kind=corrupt: {derr:?}"
    );
}
