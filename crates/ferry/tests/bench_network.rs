//! `ferry bench`'s network row, run for real: `ferry bench --rows network
//! --reps 1 --json` migrates a VM serving TCP and UDP echoes from host A
//! to host B of the netlab topology, once with Ferry and once with QEMU
//! (real KVM, real QEMU, real taps in namespaces the bench makes), while a
//! client probes it every millisecond. The test checks the outcome: on
//! Ferry the connection was kept without a reset and memory verified, the
//! client's figures of both engines and the targets are in the
//! document, and nothing the row made (namespaces, QEMU processes) is
//! left. Without root, netns tools, /dev/kvm or QEMU it says SKIPPED.
//! Without root the row itself must say SKIPPED rather than pass.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ferry, kvm_or_skip, run_bounded};
use ferry_netlab::Topology;
use serde_json::Value;

const QEMU: &str = "qemu-system-x86_64";
/// One Ferry and one QEMU run with their topologies: about 20 s here.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

fn can_run(test: &str) -> bool {
    if let Some(why) = Topology::skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        println!("SKIPPED {test}: {why}");
        return false;
    }
    if !kvm_or_skip(test) {
        return false;
    }
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        eprintln!("SKIPPED {test}: `{QEMU}` is not installed (scripts/setup.sh installs it)");
        println!("SKIPPED {test}: `{QEMU}` is not installed");
    }
    qemu
}

/// Namespaces under /run/netns whose name starts with `prefix`.
fn namespaces_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
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

#[test]
fn the_network_row_keeps_ferrys_connection_and_reports_both_engines() {
    let test = "the_network_row_keeps_ferrys_connection_and_reports_both_engines";
    if !can_run(test) {
        return;
    }
    let mut cmd = ferry();
    cmd.args(["bench", "--rows", "network", "--reps", "1", "--json"]);
    let started = Instant::now();
    let (pid, success, stdout, stderr) = run_bounded(cmd, BENCH_TIMEOUT);
    eprintln!(
        "ferry bench took {:?}; stderr:\n{stderr}",
        started.elapsed()
    );
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));

    // Nothing left behind: the topology's namespaces, the QEMUs.
    assert_eq!(
        namespaces_named(&format!("fbn{pid}-")),
        Vec::<String>::new()
    );
    assert_eq!(
        processes_mentioning(&format!("ferry-qemu-{pid}-")),
        Vec::<String>::new()
    );

    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{doc:#}");
    let row = &rows[0];
    assert_eq!(row["row"]["name"], "network");
    assert_eq!(row["ferry_errors"], Value::Array(vec![]), "{stderr}");
    assert_eq!(row["qemu_errors"], Value::Array(vec![]), "{stderr}");
    assert!(success, "ferry bench failed:\n{stderr}");
    let net = &row["network"];
    assert_eq!(net["skipped"], Value::Null, "{net:#}");
    assert_eq!(net["qemu_skipped"], Value::Null, "{net:#}");

    // Ferry: the guest moved with its memory verified, and the client's
    // one connection survived without a reset.
    let ferry_run = &row["ferry_runs"][0];
    assert_eq!(ferry_run["verified"], true, "{ferry_run:#}");
    let f = &net["ferry_runs"][0];
    eprintln!(
        "ferry: kept {}, resets {}, longest TCP gap {} ms, stall {} ms, retransmissions {}, UDP lost {}",
        f["connection_kept"],
        f["tcp_resets"],
        f["tcp_longest_gap_ms"],
        f["guest_stall_ms"],
        f["tcp_retransmissions"],
        f["udp_probes_lost"]
    );
    assert_eq!(f["connection_kept"], true, "{f:#}");
    assert_eq!(f["tcp_resets"], 0, "{f:#}");
    assert_eq!(f["tcp_requests_lost"], 0, "{f:#}");
    // Probes every 1 ms from before the migration to a second after it.
    assert!(f["tcp_requests_sent"].as_u64().unwrap() >= 1000, "{f:#}");
    let gap = f64_at(f, "tcp_longest_gap_ms");
    let stall = f64_at(f, "guest_stall_ms");
    assert!(gap > 0.0 && stall > 0.0, "{f:#}");
    assert!(f["tcp_retransmissions"].is_u64(), "{f:#}");
    assert!(f["udp_probes_lost"].is_u64(), "{f:#}");

    // QEMU: the same figures, measured the same way.
    let q = &net["qemu_runs"][0];
    eprintln!(
        "qemu: kept {}, resets {}, longest TCP gap {} ms, stall {} ms, retransmissions {}, UDP lost {}",
        q["connection_kept"],
        q["tcp_resets"],
        q["tcp_longest_gap_ms"],
        q["guest_stall_ms"],
        q["tcp_retransmissions"],
        q["udp_probes_lost"]
    );
    assert!(f64_at(q, "tcp_longest_gap_ms") > 0.0, "{q:#}");
    assert!(f64_at(q, "guest_stall_ms") > 0.0, "{q:#}");
    assert!(q["tcp_retransmissions"].is_u64(), "{q:#}");
    assert!(q["udp_probes_lost"].is_u64(), "{q:#}");
    assert!(f64_at(net, "ratio_tcp_gap") > 0.0, "{net:#}");

    // Every target is judged, kept or missed (a shared machine may miss
    // one; the bench reports it, the test only needs it judged).
    let targets = net["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 6, "{net:#}");
    for t in targets {
        eprintln!(
            "target: {} -> {} ({})",
            t["target"], t["kept"], t["measured"]
        );
        assert!(t["kept"].is_boolean(), "{t:#}");
    }
}

#[test]
fn without_root_the_network_row_says_skipped() {
    let test = "without_root_the_network_row_says_skipped";
    // As root, drop to nobody for the bench; otherwise this test already
    // runs as a user the row must refuse.
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_ferry"),
        ]);
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("SKIPPED {test}: running as root without setpriv (util-linux) to drop it");
            println!("SKIPPED {test}: no setpriv");
            return;
        }
        c
    } else {
        ferry()
    };
    cmd.args(["bench", "--rows", "network", "--reps", "1", "--no-qemu"])
        .env("TMPDIR", "/tmp");
    let (_, success, stdout, stderr) = run_bounded(cmd, Duration::from_secs(30));
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("**SKIPPED**: "), "{stdout}");
    assert!(stdout.contains("needs root"), "{stdout}");
    assert!(
        stdout.contains("| Ferry: 0 TCP resets across its migrations | - | NOT MEASURED |"),
        "{stdout}"
    );
    assert!(stderr.contains("network SKIPPED"), "{stderr}");
    // Nothing ran, so nothing failed: the skip is loud, not an error.
    assert!(success, "{stderr}");
}

#[test]
fn an_unknown_row_is_refused_with_the_list_of_rows() {
    let out = ferry()
        .args(["bench", "--rows", "netwrok", "--reps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown row \"netwrok\"") && stderr.contains("network"),
        "{stderr}"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
