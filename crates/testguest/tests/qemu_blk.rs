//! The guest's disk workload under QEMU: the same guest ELF finds QEMU
//! microvm's virtio-blk-device in its virtio-mmio slots, drives it by
//! polling from ring 3, writes generation-tagged blocks and checks every
//! block it reads back against the last write the device acknowledged,
//! while its dirty workload keeps verifying memory. A block changed
//! behind the guest's back must be caught.
//!
//! Each test makes its own raw image in a temporary directory (removed
//! when the test ends, also on failure). Without /dev/kvm or QEMU the
//! tests say `SKIPPED` loudly and return.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run_to_exit, Qemu, QemuSpec, QEMU};
use ferry_testguest::console::{exit_code, parse_line, DiskCounters, DiskUp, Line};

/// The disk workload's size: 256 blocks, one round in about two seconds
/// under QEMU here (one request costs ~3 ms), so checks start early.
const DISK_MB: u64 = 1;
const BLOCK: u64 = 4096;

/// True when this machine can run the test; otherwise says why, loudly.
fn can_run(test: &str) -> bool {
    if !common::kvm_or_skip(test) {
        return false;
    }
    let ok = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: `{QEMU}` is not installed (scripts/setup.sh installs QEMU)");
    }
    ok
}

/// A temporary directory holding the test's image; removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ferry-qemu-blk-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    /// A raw image of `bytes`, filled with `junk` (what an earlier user
    /// of the disk left there).
    fn image(&self, bytes: u64, junk: u8) -> PathBuf {
        let path = self.dir.join("disk.img");
        let file = File::create(&path).unwrap();
        file.write_all_at(&vec![junk; bytes as usize], 0).unwrap();
        file.sync_all().unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn drive_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,format=raw,id=d0,cache=none",
            image.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
    ]
}

/// Reads heartbeats until `until` holds for the disk counters (or the
/// deadline passes: a panic with the console); every line is checked on
/// the way by `check`. Returns the last counters.
fn watch(
    qemu: &mut Qemu,
    deadline: Duration,
    mut check: impl FnMut(&Qemu, &str, &DiskCounters),
    until: impl Fn(&DiskCounters) -> bool,
) -> DiskCounters {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < deadline,
            "disk counters did not get there within {deadline:?}; console:\n{}",
            qemu.console()
        );
        let raw = qemu
            .next_raw()
            .unwrap_or_else(|| panic!("QEMU stopped; console:\n{}", qemu.console()));
        match parse_line(&raw) {
            Line::Heartbeat(hb) => {
                assert_eq!(hb.err, 0, "bad memory pages; console:\n{}", qemu.console());
                let disk = DiskCounters::from_heartbeat(&raw)
                    .unwrap_or_else(|| panic!("HB without disk fields: {raw}"));
                check(qemu, &raw, &disk);
                if until(&disk) {
                    return disk;
                }
            }
            Line::PageError(_) | Line::Exit(_) => {
                panic!("unexpected {raw:?}; console:\n{}", qemu.console())
            }
            _ => check(qemu, &raw, &DiskCounters::default()),
        }
    }
}

/// Boots the guest on `image` and waits for the DISK line.
fn boot(image: &Path, append: &str) -> (Qemu, DiskUp) {
    let mut qemu = Qemu::spawn(&QemuSpec {
        extra: drive_args(image),
        ..QemuSpec::microvm(append)
    });
    loop {
        let raw = qemu
            .next_raw()
            .unwrap_or_else(|| panic!("QEMU stopped; console:\n{}", qemu.console()));
        if let Some(up) = DiskUp::parse(&raw) {
            return (qemu, up);
        }
        if matches!(parse_line(&raw), Line::Exit(_) | Line::Heartbeat(_)) {
            panic!("no DISK line before {raw:?}; console:\n{}", qemu.console());
        }
    }
}

#[test]
fn disk_blocks_are_written_and_verified_under_qemu() {
    let test = "disk_blocks_are_written_and_verified_under_qemu";
    if !can_run(test) {
        return;
    }
    let scratch = Scratch::new("verify");
    // Twice the workload's size, full of junk from "an earlier run": the
    // guest must write before it checks.
    let image = scratch.image(2 * (DISK_MB << 20), 0xa5);
    let (mut qemu, up) = boot(&image, &format!("workload=dirty:8:10 disk={DISK_MB}:max"));
    eprintln!("DISK: {up:?}");
    assert_eq!(up.capacity_sectors, 2 * (DISK_MB << 20) / 512);
    assert_eq!((up.mb, up.rate), (DISK_MB, None));
    let blocks = DISK_MB << 8;
    // A full round checked: every block read back once (the QEMU tests
    // run side by side on two cores: keep it short).
    let no_errors = |qemu: &Qemu, raw: &str, d: &DiskCounters| {
        assert!(
            !raw.starts_with("DERR"),
            "{raw}; console:\n{}",
            qemu.console()
        );
        assert_eq!(d.disk_err, 0, "{raw}; console:\n{}", qemu.console());
    };
    let last = watch(&mut qemu, Duration::from_secs(25), no_errors, |d| {
        // A FLUSH goes out once a second of writes: wait for one too.
        d.disk_ver >= blocks && (!up.flush || d.disk_flushes > 0)
    });
    eprintln!("disk after a checked round: {last:?}");
    assert!(last.disk_wr >= 2 * blocks, "{last:?}");
    assert!(last.disk_gen >= 2, "{last:?}");
    assert!(last.disk_inflight <= 1, "{last:?}");
    if up.flush {
        assert!(
            last.disk_flushes > 0,
            "FLUSH offered but never sent: {last:?}"
        );
    }
    // What the guest acknowledged is really in the image: every block's
    // first words are its own number and a generation of this run.
    drop(qemu);
    let file = File::open(&image).unwrap();
    for b in 0..blocks {
        let mut head = [0u8; 16];
        file.read_exact_at(&mut head, b * BLOCK).unwrap();
        let number = u64::from_le_bytes(head[..8].try_into().unwrap());
        let gen = u64::from_le_bytes(head[8..].try_into().unwrap());
        assert_eq!(number, b, "block {b} holds block {number}'s data");
        assert!(
            (1..=last.disk_gen + 1).contains(&gen),
            "block {b}: generation {gen}"
        );
    }
    // Beyond the workload's MB the junk is untouched.
    let mut tail = [0u8; 16];
    file.read_exact_at(&mut tail, DISK_MB << 20).unwrap();
    assert_eq!(tail, [0xa5; 16]);
}

#[test]
fn a_block_changed_behind_the_guest_is_caught() {
    let test = "a_block_changed_behind_the_guest_is_caught";
    if !can_run(test) {
        return;
    }
    let scratch = Scratch::new("corrupt");
    let image = scratch.image(DISK_MB << 20, 0);
    let (mut qemu, _) = boot(&image, &format!("workload=idle disk={DISK_MB}:max"));
    let blocks = DISK_MB << 8;
    // Once checks have begun every block was acknowledged at least once.
    watch(
        &mut qemu,
        Duration::from_secs(15),
        |_, _, _| {},
        |d| {
            assert_eq!(d.disk_err, 0, "{d:?}");
            d.disk_ver > 0
        },
    );
    // Overwrite the middle of every 16th block through the host file
    // (QEMU reads with O_DIRECT: cache=none). The block in flight may be
    // rewritten before it is read, the others are read first.
    let file = OpenOptions::new().write(true).open(&image).unwrap();
    for b in (0..blocks).step_by(16) {
        file.write_all_at(&[0xee; 64], b * BLOCK + 2048).unwrap();
    }
    file.sync_data().unwrap();
    let mut derr = Vec::new();
    let last = watch(
        &mut qemu,
        Duration::from_secs(15),
        |_, raw, _| {
            if raw.starts_with("DERR") {
                derr.push(raw.trim_end().to_owned());
            }
        },
        |d| d.disk_err >= blocks / 16 - 1,
    );
    eprintln!("after the corruption: {last:?}; {derr:?}");
    assert!(
        derr.iter().any(|l| l.contains("kind=corrupt")),
        "no DERR kind=corrupt line: {derr:?}"
    );
}

#[test]
fn disk_without_a_device_exits() {
    let test = "disk_without_a_device_exits";
    if !can_run(test) {
        return;
    }
    let (code, reason, _) = run_to_exit(&QemuSpec::microvm("workload=idle disk=1:10"));
    assert_eq!(code, exit_code::NO_DISK, "{reason}");
    assert!(reason.contains("no virtio-blk device"), "{reason}");
}

#[test]
fn a_disk_too_small_exits() {
    let test = "a_disk_too_small_exits";
    if !can_run(test) {
        return;
    }
    let scratch = Scratch::new("small");
    let image = scratch.image(512 << 10, 0);
    let (code, reason, _) = run_to_exit(&QemuSpec {
        extra: drive_args(&image),
        ..QemuSpec::microvm("workload=idle disk=1:10")
    });
    assert_eq!(code, exit_code::NO_DISK, "{reason}");
    assert!(reason.contains("1024 sectors"), "{reason}");
}

#[test]
fn bad_disk_values_exit() {
    let test = "bad_disk_values_exit";
    if !can_run(test) {
        return;
    }
    for disk in [
        "disk=0:10",
        "disk=257:10",
        "disk=1:0",
        "disk=1",
        "disk=1:x",
        "disk=1:1 disk=1:1",
    ] {
        let (code, reason, _) = run_to_exit(&QemuSpec::microvm(&format!("workload=idle {disk}")));
        assert_eq!(code, exit_code::BAD_CMDLINE, "{disk}: {reason}");
        assert!(reason.contains("disk="), "{disk}: {reason}");
    }
}
