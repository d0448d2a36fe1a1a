//! `ferry demo` as a new user runs it: between two ferryd agents (the
//! default) and engine to engine (`--direct`). Each must move the VM and
//! show that the guest verified its memory on B, and leave nothing behind:
//! no agent, no VMM, no namespace, no directory.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A demo that has not ended by then has hung.
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `ferry demo --json EXTRA`; its exit status and report.
fn run_demo(extra: &[&str]) -> (std::process::ExitStatus, Value, u32) {
    let mut child = common::ferry()
        .arg("demo")
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ferry demo");
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + DEMO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry demo {extra:?} did not end within {DEMO_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader.join().unwrap();
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ferry demo --json printed no JSON report ({e}): {text}"));
    (status, report, pid)
}

fn assert_verified_on_b(report: &Value) {
    assert_eq!(report["ok"], true, "verdict: {}", report["verdict"]);
    assert_eq!(report["migration"]["outcome"], "committed");
    let last = report["source_last_seq"].as_u64().expect("A's last seq");
    let dest = &report["destination"];
    assert_eq!(
        dest["first_seq"].as_u64(),
        Some(last + 1),
        "B must continue A's heartbeats: {dest}"
    );
    assert_eq!(dest["errors"], 0, "{dest}");
    assert!(dest["pages_verified"].as_u64().unwrap() > 0, "{dest}");
    assert!(dest["sweeps_on_b"].as_u64().unwrap() >= 1, "{dest}");
    assert_eq!(report["source_errors"], 0);
}

/// Nothing the demo process `pid` made is left.
fn assert_nothing_left(pid: u32) {
    let dir = std::env::temp_dir().join(format!("ferry-demo-{pid}"));
    assert!(!dir.exists(), "{} is left behind", dir.display());
    let needle = dir.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = ferry_agent::procs::processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the demo are left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let namespaces = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("fdemo{pid}-")) || n.starts_with(&format!("fnet{pid}-")))
        .collect::<Vec<_>>();
    assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");
}

#[test]
fn the_demo_moves_the_vm_between_two_agents_and_verifies_it_on_b() {
    let test = "the_demo_moves_the_vm_between_two_agents_and_verifies_it_on_b";
    if !common::kvm_or_skip(test) {
        return;
    }
    let (status, report, pid) = run_demo(&[]);
    assert_verified_on_b(&report);
    assert!(status.success(), "ferry demo exited {status}");
    let hosts = report["hosts"].as_str().unwrap();
    assert!(hosts.starts_with("two ferryd agents"), "{hosts}");
    assert!(
        hosts.contains("hostA") && hosts.contains("hostB"),
        "{hosts}"
    );
    let transport = report["migration"]["transport"]
        .as_str()
        .unwrap_or_default();
    assert!(
        transport.starts_with("tls1.3 ") && transport.contains("peer host hostB"),
        "the agents' data plane must be mutual TLS: {transport}"
    );
    if nix_is_root() {
        assert!(
            hosts.contains("in namespace"),
            "as root each host has its own namespace: {hosts}"
        );
    }
    assert_nothing_left(pid);
}

#[test]
fn the_direct_demo_moves_the_vm_engine_to_engine_and_verifies_it_on_b() {
    let test = "the_direct_demo_moves_the_vm_engine_to_engine_and_verifies_it_on_b";
    if !common::kvm_or_skip(test) {
        return;
    }
    let (status, report, pid) = run_demo(&["--direct"]);
    assert_verified_on_b(&report);
    assert!(status.success(), "ferry demo --direct exited {status}");
    assert!(report["hosts"].as_str().unwrap().starts_with("direct"));
    assert_nothing_left(pid);
}

#[test]
fn the_network_demo_keeps_the_tcp_connection_across_the_move() {
    let test = "the_network_demo_keeps_the_tcp_connection_across_the_move";
    if !common::kvm_or_skip(test) {
        return;
    }
    if !nix_is_root() {
        println!("SKIPPED {test}: the network demo builds namespaces and taps (needs root)");
        eprintln!("SKIPPED {test}: the network demo builds namespaces and taps (needs root)");
        return;
    }
    let (status, report, pid) = run_demo(&["network"]);
    assert_verified_on_b(&report);
    assert!(status.success(), "ferry demo network exited {status}");
    let net = &report["network"];
    eprintln!(
        "{test}: TCP {} sent, longest reply gap {} ms, {} retransmissions; UDP {} sent; guest stall {} ms",
        net["tcp_requests_sent"],
        net["tcp_longest_reply_gap_ms"],
        net["tcp_retransmissions"],
        net["udp_probes_sent"],
        net["guest_stall_ms"]
    );
    assert_eq!(net["connection_kept"], true, "{net}");
    assert_eq!(net["tcp_resets"], 0, "{net}");
    assert_eq!(net["tcp_requests_lost"], 0, "{net}");
    assert_eq!(net["udp_probes_lost"], 0, "{net}");
    assert!(net["tcp_requests_sent"].as_u64().unwrap() >= 1000, "{net}");
    assert_eq!(
        report["migration"]["network"]["dropped"], 0,
        "the source dropped frames: {}",
        report["migration"]["network"]
    );
    assert_nothing_left(pid);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `ferry demo storage --local` and `--shared`: B's guest reads back a
/// whole round of its disk with no bad block, B holds the image's lock,
/// and the demo's images are gone afterwards.
#[test]
fn the_storage_demo_moves_a_disk_copied_and_shared_and_checks_it_on_b() {
    let test = "the_storage_demo_moves_a_disk_copied_and_shared_and_checks_it_on_b";
    if !common::kvm_or_skip(test) {
        return;
    }
    for kind in ["--local", "--shared"] {
        let (status, report, pid) = run_demo(&["storage", kind]);
        assert_verified_on_b(&report);
        assert!(
            status.success(),
            "ferry demo storage {kind} exited {status}"
        );
        let disk = &report["storage"];
        eprintln!(
            "{test}: {kind}: {disk}; host downtime {} ms",
            report["migration"]["blackout"]["host_downtime_ms"]
        );
        assert_eq!(disk["disk_errors_on_b"], 0, "{disk}");
        assert!(
            disk["blocks_checked_on_b"].as_u64().unwrap() >= 256,
            "{disk}"
        );
        assert_eq!(disk["b_holds_lock"], true, "{disk}");
        match kind {
            "--local" => {
                let copy = &disk["copy"];
                assert!(copy["blocks_sent"].as_u64().unwrap() >= 256, "{copy}");
                // A sparse image: the first pass reads only what holds data.
                assert!(copy["first_pass_blocks"].as_u64().unwrap() < 4096, "{copy}");
                assert_ne!(disk["image_on_a"], disk["image_on_b"]);
            }
            _ => {
                assert_eq!(disk["image_on_a"], disk["image_on_b"]);
                assert!(disk["lock_released_ms"].as_f64().is_some(), "{disk}");
            }
        }
        let dir = std::env::temp_dir().join(format!("ferry-demo-storage-{pid}"));
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert_nothing_left(pid);
    }
}
