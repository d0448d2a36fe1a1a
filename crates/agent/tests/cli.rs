//! `ferry vm ...` against a real ferryd: tables for people, `--json` for
//! programs, a clear error and exit status 1 for a refusal.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{alive, kvm_or_skip, Agent};

fn ferry_vm(agent: &Agent, args: &[&str]) -> Output {
    Command::new(common::ferry_bin())
        .arg("vm")
        .args(args)
        .arg("--agent")
        .arg(&agent.socket)
        .output()
        .expect("run ferry vm")
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ferry vm failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn ferry_vm_drives_the_agent() {
    if !kvm_or_skip("ferry_vm_drives_the_agent") {
        return;
    }
    let agent = Agent::new("cli", "1G", 4);

    let out = ok_stdout(&ferry_vm(
        &agent,
        &[
            "create",
            "--id",
            "c1",
            "--mem",
            "64M",
            "--workload",
            "dirty:16:50",
            "--downtime",
            "5ms",
            "--allow-postcopy",
            "--json",
        ],
    ));
    let created: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(created["state"], "running");
    assert_eq!(created["policy"]["downtime_ms"], 5.0);
    assert_eq!(created["policy"]["allow_postcopy"], true);
    assert_eq!(created["policy"]["allow_auto_converge"], true);
    let pid = created["pid"].as_u64().unwrap() as u32;

    let table = ok_stdout(&ferry_vm(&agent, &["list"]));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{table}");
    let row = lines.next().expect("a row for c1");
    assert!(
        row.starts_with("c1 ") && row.contains("running") && row.contains("64 MiB"),
        "{table}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok_stdout(&ferry_vm(&agent, &["list", "--json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    agent.heartbeat_after("c1", 2, Duration::from_secs(10));
    let show = ok_stdout(&ferry_vm(&agent, &["show", "c1"]));
    assert!(
        show.contains("latest heartbeat") && show.contains("err 0"),
        "{show}"
    );
    assert!(
        show.contains(&format!("VMM pid            {pid}")),
        "{show}"
    );

    let paused = ok_stdout(&ferry_vm(&agent, &["pause", "c1"]));
    assert_eq!(paused.trim(), "VM c1 paused");
    let refused = ferry_vm(&agent, &["pause", "c1"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("409") && err.contains("paused, not running"),
        "{err}"
    );
    let json_refusal = ferry_vm(&agent, &["pause", "c1", "--json"]);
    assert_eq!(json_refusal.status.code(), Some(1));
    let body: serde_json::Value = serde_json::from_slice(&json_refusal.stdout).unwrap();
    assert_eq!(body["error"], "conflict");
    assert_eq!(
        ok_stdout(&ferry_vm(&agent, &["resume", "c1"])).trim(),
        "VM c1 running"
    );

    let snap = agent.dir.path("c1.snap");
    let out = ok_stdout(&ferry_vm(
        &agent,
        &["snapshot", "c1", snap.to_str().unwrap()],
    ));
    assert!(out.starts_with("snapshot written to"), "{out}");
    assert!(std::fs::metadata(&snap).unwrap().len() > 16 << 20);

    let out = ferry_vm(&agent, &["show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM nope"));

    assert_eq!(
        ok_stdout(&ferry_vm(&agent, &["delete", "c1"])).trim(),
        "VM c1 deleted"
    );
    assert!(!alive(pid));

    // No agent there: a clear message.
    let out = Command::new(common::ferry_bin())
        .args(["vm", "list", "--agent"])
        .arg(agent.dir.path("nobody.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach ferryd"));
}

#[test]
fn ferry_vm_create_gives_the_agent_a_network_and_a_local_disk() {
    if !kvm_or_skip("ferry_vm_create_gives_the_agent_a_network_and_a_local_disk") {
        return;
    }
    let agent = Agent::new("cli-dev", "1G", 4);
    let fails = |args: &[&str], words: &str| {
        let out = ferry_vm(&agent, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(words), "{args:?}: {err}");
    };
    // A tap is the agent's to make: refused before it is asked.
    fails(
        &["create", "--mem", "64M", "--net", "tap=t0"],
        "--network NAME",
    );
    fails(
        &["create", "--mem", "64M", "--mac", "52:54:00:00:00:01"],
        "--network",
    );
    fails(&["create", "--mem", "64M", "--local-disk"], "--disk");
    // A network this host lacks: the agent's refusal, and nothing made.
    fails(
        &[
            "create",
            "--id",
            "n1",
            "--mem",
            "64M",
            "--network",
            "nosuch",
        ],
        "nosuch",
    );

    let image = agent.dir.path("local.img");
    std::fs::write(&image, vec![0u8; 2 << 20]).unwrap();
    let disk = format!("path={}", image.display());
    let out = ok_stdout(&ferry_vm(
        &agent,
        &[
            "create",
            "--id",
            "d1",
            "--mem",
            "256M",
            "--workload",
            "dirty:32:10+disk:1:max",
            "--disk",
            &disk,
            "--local-disk",
            "--json",
        ],
    ));
    let created: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(created["state"], "running", "{created}");
    assert_eq!(created["definition"]["disk"]["local"], true, "{created}");
    let list: serde_json::Value =
        serde_json::from_str(&ok_stdout(&ferry_vm(&agent, &["list", "--json"]))).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(ids, ["d1"], "{list}");
    assert_eq!(
        ok_stdout(&ferry_vm(&agent, &["delete", "d1"])).trim(),
        "VM d1 deleted"
    );
}
