//! `ferry bench`'s storage rows, run for real: `ferry bench --rows
//! disk-shared,disk-local --reps 1 --no-qemu --json` moves the same VM
//! with a disk the guest writes and checks (on shared storage, then
//! copied) and without it (real KVM, real files). The test checks the
//! outcome: every run verified, memory and disk (a whole round of blocks
//! checked on the destination), both sets of figures in the document, the
//! shared row's target judged, and the bench's images gone afterwards.
//!
//! The second test runs the local row with QEMU too (`--rows disk-local
//! --reps 1 --json`): QEMU mirrors the same disk to an NBD export on its
//! destination around its migration, and its guest must check a whole
//! round of that disk on the destination, no bad block, as Ferry's does;
//! the row then carries both engines' figures and the ratios, and leaves
//! no image and no QEMU behind. Without /dev/kvm or QEMU it says SKIPPED.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ferry, kvm_or_skip, run_bounded};
use serde_json::Value;

/// Two rows of two runs each: about 20 s here.
const BENCH_TIMEOUT: Duration = Duration::from_secs(240);
const QEMU: &str = "qemu-system-x86_64";
/// The disk workload's blocks (`+disk:1:max`): a whole round.
const DISK_ROUND: u64 = 256;

/// Files in the temporary directory's subdirectories whose name starts
/// with `bench-disk-PID`: the bench's images.
fn images_left(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .flat_map(|e| e.path().read_dir().into_iter().flatten().flatten())
        .filter(|f| {
            f.file_name()
                .to_string_lossy()
                .starts_with(&format!("bench-disk-{pid}"))
        })
        .map(|f| f.path())
        .collect()
}

/// Processes whose command line mentions `needle` (the bench's QEMUs
/// carry their QMP directory, named after the bench's pid).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn f64_at(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v:#}"))
}

fn u64_at(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v:#}"))
}

#[test]
fn the_storage_rows_move_the_vm_with_and_without_its_disk_and_check_both() {
    let test = "the_storage_rows_move_the_vm_with_and_without_its_disk_and_check_both";
    if !kvm_or_skip(test) {
        return;
    }
    let mut cmd = ferry();
    cmd.args([
        "bench",
        "--rows",
        "disk-shared,disk-local",
        "--reps",
        "1",
        "--no-qemu",
        "--json",
    ]);
    let (pid, ok, stdout, stderr) = run_bounded(cmd, BENCH_TIMEOUT);
    assert!(ok, "ferry bench failed:\n{stderr}");
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no JSON document ({e}):\n{stdout}\n{stderr}"));
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{doc:#}");
    for row in rows {
        let name = row["row"]["name"].as_str().unwrap();
        assert_eq!(
            row["ferry_errors"],
            serde_json::json!([]),
            "{name}: {row:#}"
        );
        let with = &row["ferry_runs"][0];
        assert_eq!(
            with["verified"], true,
            "{name}: {:#}",
            with["verify_failures"]
        );
        assert!(
            with["disk_blocks_checked"].as_u64().unwrap() >= 256,
            "{name}: {with:#}"
        );
        let st = &row["storage"];
        let without = &st["without_disk_runs"][0];
        assert_eq!(without["verified"], true, "{name}: {without:#}");
        assert!(without["disk_blocks_checked"].is_null(), "{name}");
        eprintln!(
            "{test}: {name}: downtime with the disk {} ms, without {} ms; target kept {}",
            st["with_disk_downtime_ms"], st["without_disk_downtime_ms"], st["target_kept"]
        );
        match name {
            "disk-shared" => assert!(st["target_kept"].is_boolean(), "{st:#}"),
            "disk-local" => {
                assert!(st["target_kept"].is_null(), "{st:#}");
                let copy = &with["report"]["disk_copy"];
                assert!(copy["blocks_sent"].as_u64().unwrap() >= 256, "{copy}");
            }
            other => panic!("unexpected row {other}"),
        }
    }
    let left = images_left(pid);
    assert!(left.is_empty(), "the bench left its images: {left:?}");
}

#[test]
fn the_local_row_sets_ferry_against_qemus_mirror_to_nbd_and_both_guests_check_their_disk() {
    let test =
        "the_local_row_sets_ferry_against_qemus_mirror_to_nbd_and_both_guests_check_their_disk";
    if !kvm_or_skip(test) {
        return;
    }
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        eprintln!("SKIPPED {test}: `{QEMU}` is not installed (scripts/setup.sh installs it)");
        println!("SKIPPED {test}: `{QEMU}` is not installed");
        return;
    }
    let mut cmd = ferry();
    cmd.args(["bench", "--rows", "disk-local", "--reps", "1", "--json"]);
    let (pid, ok, stdout, stderr) = run_bounded(cmd, BENCH_TIMEOUT);
    assert!(ok, "ferry bench failed:\n{stderr}");
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no JSON document ({e}):\n{stdout}\n{stderr}"));
    let row = &doc["rows"][0];
    assert_eq!(row["row"]["name"], "disk-local", "{doc:#}");
    assert_eq!(row["ferry_errors"], serde_json::json!([]), "{row:#}");
    assert_eq!(row["qemu_errors"], serde_json::json!([]), "{row:#}");

    // Ferry's move with the disk, verified as in the test above.
    let ferry_run = &row["ferry_runs"][0];
    assert_eq!(
        ferry_run["verified"], true,
        "{:#}",
        ferry_run["verify_failures"]
    );
    assert!(u64_at(ferry_run, "disk_blocks_checked") >= DISK_ROUND);

    // QEMU's: its destination's guest checked a whole round of the
    // mirrored disk with no bad block, and its memory.
    let runs = row["qemu_runs"].as_array().expect("qemu_runs");
    assert_eq!(runs.len(), 1, "{row:#}");
    let q = &runs[0];
    assert_eq!(q["verified"], true, "{:#}", q["verify_failures"]);
    assert_eq!(q["verify_failures"], serde_json::json!([]));
    assert_eq!(u64_at(q, "errors"), 0);
    assert!(u64_at(q, "dst_sweeps_verified") >= 1, "{q:#}");
    assert_eq!(
        q["statuses"].as_array().and_then(|s| s.last()),
        Some(&Value::from("completed")),
        "{q:#}"
    );
    let disk = &q["disk"];
    assert!(
        u64_at(disk, "disk_blocks_checked") >= DISK_ROUND,
        "{disk:#}"
    );
    assert_eq!(u64_at(disk, "disk_errors"), 0, "{disk:#}");
    // Everything the guest wrote went over the mirror's NBD connection
    // (at least its 1 MiB of blocks), and the job covered the 16 MiB image.
    let mirror = u64_at(disk, "mirror_bytes_sent");
    assert!(mirror >= 1 << 20, "{disk:#}");
    assert!(u64_at(disk, "mirror_job_bytes") >= 16 << 20, "{disk:#}");
    // The working set (64 MiB) went as memory; bytes sent are both.
    let ram = u64_at(disk, "ram_bytes");
    assert!(ram >= 64 << 20, "{disk:#}");
    assert_eq!(u64_at(q, "transferred_bytes"), ram + mirror, "{q:#}");
    let total = f64_at(q, "total_ms");
    let stall = f64_at(q, "guest_stall_ms");
    assert!(total > f64_at(disk, "mirror_ready_ms"), "{q:#}");
    assert!(stall > 0.0 && stall < total, "{q:#}");
    assert!(f64_at(disk, "completion_to_cont_ms") >= f64_at(disk, "mirror_cancel_ms"));

    // The row: both engines' medians and the ratios, in the document.
    for key in ["ratio_total", "ratio_stall", "ratio_bytes"] {
        assert!(f64_at(row, key) > 0.0, "{key}: {row:#}");
    }
    assert_eq!(row["qemu"]["verified"], "1/1", "{row:#}");
    let st = &row["storage"];
    let qd = &st["qemu_with_disk"];
    assert_eq!(qd["verified"], "1/1", "{st:#}");
    assert_eq!(f64_at(qd, "total_ms"), total);
    let ratio = f64_at(row, "ratio_total");
    let expected = f64_at(st, "with_disk_total_ms") / total;
    assert!((ratio - expected).abs() < 1e-9, "{ratio} vs {expected}");
    eprintln!(
        "{test}: ferry total {} ms, stall {} ms, {} MiB; qemu total {total} ms, stall {stall} ms, {} MiB ({} MiB on the mirror); ratios {} / {} / {}",
        st["with_disk_total_ms"],
        st["with_disk_stall_ms"],
        st["with_disk_mib_sent"],
        qd["mib_sent"],
        qd["mirror_mib_sent"],
        row["ratio_total"],
        row["ratio_stall"],
        row["ratio_bytes"],
    );

    // Nothing left: the images, the QEMUs.
    let left = images_left(pid);
    assert!(left.is_empty(), "the bench left its images: {left:?}");
    let qemus = processes_mentioning(&format!("ferry-qemu-{pid}-"));
    assert!(qemus.is_empty(), "the bench left QEMU running: {qemus:?}");
}
