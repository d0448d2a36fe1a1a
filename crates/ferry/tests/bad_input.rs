//! Bad input gets a clear error, a non-zero exit status, and no VM: the
//! process ends at once without a single guest heartbeat.

mod common;

use std::time::{Duration, Instant};

use common::{ferry, kvm_or_skip};

/// Runs `ferry run ARGS --duration 2s` and returns (stderr, stdout),
/// asserting it failed fast without booting a guest.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let t0 = Instant::now();
    let out = ferry()
        .arg("run")
        .args(args)
        .args(["--duration", "2s"])
        .envs(env.iter().copied())
        .output()
        .expect("run ferry");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success(),
        "{args:?} must fail; stderr: {stderr}"
    );
    assert!(
        !stdout.contains("HB seq="),
        "{args:?} must not boot a guest; stdout: {stdout}"
    );
    assert!(
        !stderr.contains("VM started"),
        "{args:?} must not start a VM: {stderr}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{args:?} must fail fast"
    );
    stderr
}

fn assert_says(stderr: &str, words: &[&str]) {
    for w in words {
        assert!(
            stderr.contains(w),
            "expected {w:?} in the error, got: {stderr}"
        );
    }
}

#[test]
fn missing_kvm_device() {
    let err = refused(&[], &[("FERRY_KVM_DEVICE", "/nonexistent/kvm")]);
    assert_says(&err, &["/nonexistent/kvm", "does not exist"]);
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let err = refused(&[], &[("FERRY_KVM_DEVICE", "/dev/null")]);
    assert_says(&err, &["/dev/null"]);
}

#[test]
fn guest_file_missing() {
    let err = refused(&["--guest", "/nonexistent/guest.elf"], &[]);
    if kvm_or_skip("guest_file_missing (reaches the loader only with KVM)") {
        assert_says(&err, &["/nonexistent/guest.elf", "does not exist"]);
    }
}

#[test]
fn guest_file_not_elf() {
    let path = std::env::temp_dir().join(format!("ferry-not-elf-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho this is not a guest\n").unwrap();
    let err = refused(&["--guest", path.to_str().unwrap()], &[]);
    std::fs::remove_file(&path).ok();
    if kvm_or_skip("guest_file_not_elf (reaches the loader only with KVM)") {
        assert_says(&err, &["not a loadable x86-64 ELF"]);
    }
}

#[test]
fn memory_sizes() {
    assert_says(&refused(&["--mem", "0M"], &[]), &["greater than zero"]);
    assert_says(&refused(&["--mem", "lots"], &[]), &["not a size"]);
    assert_says(&refused(&["--mem", "1024"], &[]), &["no unit"]);
    assert_says(&refused(&["--mem", "3X"], &[]), &["unknown unit"]);
    assert_says(&refused(&["--mem", "1000000G"], &[]), &["more than"]);
    assert_says(&refused(&["--mem", "20T"], &[]), &["more than"]);
}

#[test]
fn vcpu_counts() {
    assert_says(&refused(&["--vcpus", "0"], &[]), &["--vcpus"]);
    assert_says(&refused(&["--vcpus", "100000"], &[]), &["--vcpus"]);
    assert_says(&refused(&["--vcpus", "two"], &[]), &["--vcpus"]);
}

#[test]
fn workloads() {
    assert_says(&refused(&["--workload", "dirty"], &[]), &["--workload"]);
    assert_says(
        &refused(&["--workload", "dirty:abc:100"], &[]),
        &["--workload"],
    );
    assert_says(&refused(&["--workload", "spin:1"], &[]), &["--workload"]);
    assert_says(
        &refused(&["--workload", "dirty:1:2:3:4"], &[]),
        &["--workload"],
    );
    assert_says(
        &refused(&["--mem", "256M", "--workload", "dirty:512:100"], &[]),
        &["does not fit", "256 MiB"],
    );
}

#[test]
fn unknown_flag() {
    assert_says(&refused(&["--memory", "1G"], &[]), &["--memory"]);
}

#[test]
fn migrate_stream_counts() {
    for bad in ["0", "9", "many"] {
        let out = ferry()
            .args(["migrate", "/nonexistent/ferry.sock", "--to", "127.0.0.1:1"])
            .args(["--streams", bad])
            .output()
            .expect("run ferry");
        assert!(!out.status.success(), "--streams {bad} must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_says(&stderr, &["--streams", "auto or a number from 1 to 8"]);
    }
}
