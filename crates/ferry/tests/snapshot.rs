//! Real KVM snapshot and restore across separate processes: the guest's
//! heartbeat sequence continues, its counters never go backwards, and it
//! verifies its whole working set after every restore with no error.

mod common;

use std::time::Duration;

use common::{
    kvm_or_skip, next_heartbeat, ready_vm_with_api, snapshot, wait_for_socket, RunningFerry,
    TempDir,
};
use ferry_testguest::console::{Heartbeat, Line};

/// Takes a snapshot with --stop and waits for the VM's process to end;
/// returns the last heartbeat the VM printed before it stopped.
fn snapshot_and_stop(vm: RunningFerry, socket: &str, file: &str) -> Heartbeat {
    let out = snapshot(socket, file, &["--stop", "--json"]);
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snapshot --json");
    assert_eq!(report["stopped"], true);
    assert!(report["stats"]["pages_written"].as_u64().unwrap() > 0);
    let (status, console) = vm.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "VM process after snapshot --stop: {status:?}\n{}",
        console.join("\n")
    );
    assert!(
        std::path::Path::new(file).exists(),
        "no snapshot file at {file}"
    );
    console
        .iter()
        .rev()
        .find_map(|l| match ferry_testguest::console::parse_line(l) {
            Line::Heartbeat(hb) => Some(hb),
            _ => None,
        })
        .expect("the VM printed heartbeats before it stopped")
}

/// Restores `file` and checks that the guest continues from `before` and
/// then verifies its whole working set; returns the running VM.
fn restore_and_verify(file: &str, socket: &str, before: &Heartbeat) -> RunningFerry {
    let mut vm = RunningFerry::spawn_command("restore", &[file, "--api", socket]);
    let first = next_heartbeat(&mut vm, Duration::from_secs(20));
    assert!(
        first.seq > before.seq && first.seq <= before.seq + 2,
        "sequence must continue: {} before the snapshot, {} after",
        before.seq,
        first.seq
    );
    assert!(
        first.wr >= before.wr && first.ver >= before.ver,
        "counters went backwards"
    );
    assert!(first.t_ms >= before.t_ms, "the guest clock went backwards");
    let target = first.sweeps + 1;
    loop {
        let hb = next_heartbeat(&mut vm, Duration::from_secs(10));
        assert_eq!(
            hb.err,
            0,
            "bad pages after restore:\n{}",
            vm.seen.join("\n")
        );
        if hb.sweeps >= target {
            break;
        }
    }
    wait_for_socket(socket);
    vm
}

#[test]
fn ten_snapshot_restore_cycles_keep_every_page() {
    if !kvm_or_skip("ten_snapshot_restore_cycles_keep_every_page") {
        return;
    }
    let dir = TempDir::new("cycles");
    let (mut vm, socket) = ready_vm_with_api(&dir, "1G", "2", "dirty:256:100");
    next_heartbeat(&mut vm, Duration::from_secs(5));
    for cycle in 0..10 {
        let file = dir.path(&format!("cycle{cycle}.snap"));
        let before = snapshot_and_stop(vm, &socket, &file);
        vm = restore_and_verify(&file, &socket, &before);
        std::fs::remove_file(&file).unwrap();
    }
    let (status, console) = vm.stop();
    assert!(status.success(), "{}", console.join("\n"));
}

#[test]
fn snapshot_of_an_unthrottled_writer_has_no_stale_page() {
    if !kvm_or_skip("snapshot_of_an_unthrottled_writer_has_no_stale_page") {
        return;
    }
    let dir = TempDir::new("max");
    let file = dir.path("max.snap");
    let (mut vm, socket) = ready_vm_with_api(&dir, "1G", "2", "dirty:256:max");
    // A snapshot that resumes: the VM goes on with no error.
    let out = snapshot(&socket, &file, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = next_heartbeat(&mut vm, Duration::from_secs(5));
    let again = next_heartbeat(&mut vm, Duration::from_secs(5));
    assert!(
        again.wr > after.wr,
        "the VM must run on after a snapshot without --stop"
    );
    assert_eq!(again.err, 0);
    let before = snapshot_and_stop(vm, &socket, &file);
    let vm = restore_and_verify(&file, &socket, &before);
    let (status, console) = vm.stop();
    assert!(status.success(), "{}", console.join("\n"));
}
