//! `ferry bench`'s storage rows, run for real: `ferry bench --rows
//! disk-shared,disk-local --reps 1 --no-qemu --json` moves the same VM
//! with a disk the guest writes and checks (on shared storage, then
//! copied) and without it (real KVM, real files). The test checks the
//! outcome: every run verified, memory and disk (a whole round of blocks
//! checked on the destination), both sets of figures in the document, the
//! shared row's target judged, and the bench's images gone afterwards.

mod common;

use std::time::Duration;

use common::{ferry, kvm_or_skip, run_bounded};
use serde_json::Value;

/// Two rows of two runs each: about 20 s here.
const BENCH_TIMEOUT: Duration = Duration::from_secs(240);

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
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.path()
                .read_dir()
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| {
                    f.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("bench-disk-{pid}"))
                })
        })
        .collect();
    assert!(left.is_empty(), "the bench left its images: {left:?}");
}
