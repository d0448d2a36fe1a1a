//! Bad snapshots and bad snapshot targets: a clear error naming what is
//! wrong, no VM started, and never a file (or a temp file) left under the
//! final name. A failed snapshot leaves the VM running.

mod common;

use std::time::Duration;

use common::{
    ferry, kvm_or_skip, next_heartbeat, ready_vm_with_api, snapshot, RunningFerry, TempDir,
};

/// A small running VM with an API socket, READY.
fn small_vm(dir: &TempDir) -> (RunningFerry, String) {
    ready_vm_with_api(dir, "256M", "2", "dirty:32:50")
}

/// `ferry restore FILE ARGS` must fail fast, start no VM, and say `words`.
fn restore_refused(file: &str, args: &[&str], words: &[&str]) {
    let out = ferry()
        .args(["restore", file, "--duration", "3s"])
        .args(args)
        .output()
        .expect("run ferry restore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "restore of {file} {args:?} must fail"
    );
    assert!(!stdout.contains("HB seq="), "no guest may run: {stdout}");
    assert!(
        !stderr.contains("ferry: restored"),
        "no VM may start: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "expected {w:?} in: {stderr}");
    }
}

fn no_files_but(dir: &TempDir, allowed: &[&str]) {
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !allowed.contains(&n.as_str()))
        .collect();
    assert!(names.is_empty(), "unexpected files left behind: {names:?}");
}

#[test]
fn corrupt_and_mismatched_snapshots_are_refused() {
    if !kvm_or_skip("corrupt_and_mismatched_snapshots_are_refused") {
        return;
    }
    let dir = TempDir::new("corrupt");
    let (vm, socket) = small_vm(&dir);
    let good = dir.path("good.snap");
    let out = snapshot(&socket, &good, &["--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.wait_exit(Duration::from_secs(20));
    let bytes = std::fs::read(&good).unwrap();
    let state_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let data_offset = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;

    let variant = |name: &str, data: &[u8]| {
        let path = dir.path(name);
        std::fs::write(&path, data).unwrap();
        path
    };
    // Truncated anywhere: header, state record, memory, trailer.
    for (name, len) in [
        ("t-header.snap", 20),
        ("t-state.snap", 48 + state_len / 2),
        ("t-memory.snap", bytes.len() / 2),
        ("t-trailer.snap", bytes.len() - 3),
    ] {
        restore_refused(&variant(name, &bytes[..len]), &[], &["truncated"]);
    }
    // A flipped byte anywhere: magic, state record, index padding, a memory
    // page, trailer.
    for (name, at, words) in [
        ("f-magic.snap", 2, &["not a Ferry snapshot"][..]),
        ("f-state.snap", 48 + state_len / 2, &["corrupt"][..]),
        (
            "f-memory.snap",
            data_offset + 4096 + 7,
            &["memory checksum"][..],
        ),
        ("f-index.snap", data_offset - 1, &["metadata checksum"][..]),
        ("f-trailer.snap", bytes.len() - 12, &["corrupt"][..]),
    ] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        restore_refused(&variant(name, &bad), &[], words);
    }
    // An unknown format version.
    let mut future = bytes.clone();
    future[8] = 9;
    restore_refused(&variant("v9.snap", &future), &[], &["format 9"]);
    // Not what was asked for.
    restore_refused(&good, &["--vcpus", "1"], &["2 vCPUs, not 1"]);
    restore_refused(&good, &["--mem", "1G"], &["256 MiB of memory, not 1 GiB"]);
    restore_refused(
        &dir.path("missing.snap"),
        &[],
        &["missing.snap", "No such file"],
    );
    // And the good one still restores.
    let mut restored =
        RunningFerry::spawn_command("restore", &[&good, "--vcpus", "2", "--mem", "256M"]);
    let hb = next_heartbeat(&mut restored, Duration::from_secs(20));
    assert_eq!(hb.err, 0);
    restored.stop();
}

#[test]
fn unwritable_targets_leave_the_vm_running_and_no_file() {
    if !kvm_or_skip("unwritable_targets_leave_the_vm_running_and_no_file") {
        return;
    }
    let dir = TempDir::new("unwritable");
    let (mut vm, socket) = small_vm(&dir);

    // A directory that does not exist: refused before the VM is touched.
    let out = snapshot(&socket, &dir.path("nope/x.snap"), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // A read-only file system, and a full one (small tmpfs mounts; root only).
    let ro = dir.0.join("ro");
    let full = dir.0.join("full");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&full).unwrap();
    let mount = |opts: &str, at: &std::path::Path| {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !(mount("ro,size=1M", &ro) && mount("size=8M", &full)) {
        eprintln!("SKIPPED read-only/full-disk snapshot cases: cannot mount tmpfs (needs root)");
        vm.stop();
        return;
    }
    let cases = [
        (ro.join("x.snap"), "Read-only file system"),
        (full.join("x.snap"), "No space left on device"),
    ];
    for (target, why) in &cases {
        let out = snapshot(&socket, target.to_str().unwrap(), &["--stop"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "snapshot to {target:?} must fail");
        assert!(stderr.contains(why), "expected {why:?} in: {stderr}");
        assert!(
            stderr.contains("resumed"),
            "the error must say the VM was resumed: {stderr}"
        );
        assert!(!target.exists(), "no file may appear under the final name");
        // The VM was resumed despite --stop: it keeps writing, with no error.
        let a = next_heartbeat(&mut vm, Duration::from_secs(5));
        let b = next_heartbeat(&mut vm, Duration::from_secs(5));
        assert!(
            b.wr > a.wr && b.err == 0,
            "the VM must run on after a failed snapshot"
        );
    }
    let full_left: Vec<_> = std::fs::read_dir(&full).unwrap().collect();
    assert!(
        full_left.is_empty(),
        "a temp file was left on the full disk"
    );
    for at in [&ro, &full] {
        let _ = std::process::Command::new("umount").arg(at).status();
    }
    vm.stop();
    no_files_but(&dir, &["ro", "full", "vm.sock"]);
}
