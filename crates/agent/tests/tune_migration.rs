//! `PATCH /v1/migrations/{id}` between two real `ferryd` processes on real
//! KVM: a migration held to 50 MiB/s is uncapped with `ferry migration
//! tune` and ends well before the cap would have let it, verified on the
//! destination; post-copy on a VM whose policy forbids it is refused with
//! 422 and the migration goes on; bad bodies are 400, an unknown job 404,
//! an ended one 409; and a capped pre-copy switched to post-copy by the
//! operator, on a VM whose policy allows it, follows a lifted cap in its
//! push and commits verified. A retune while the job still prepares is
//! kept, shown, and the engine starts with it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::peers::reserved;
use common::peers::{agent, host, peer_addr, wait_job, Fleet};
use common::{ferry_bin, kvm_or_skip, Agent};
use serde_json::{json, Value};

fn patch(agent: &Agent, job: &str, body: &str) -> ferry_agent::client::Reply {
    agent
        .client
        .request_raw(
            "PATCH",
            &format!("/v1/migrations/{job}"),
            Some("application/json"),
            body.as_bytes().to_vec(),
        )
        .expect("PATCH")
}

#[test]
fn an_uncapped_migration_finishes_faster_than_its_cap_allowed_and_bad_patches_change_nothing() {
    if !kvm_or_skip("an_uncapped_migration_finishes_faster_than_its_cap_allowed") {
        return;
    }
    let fleet = Fleet::new("tune");
    let a = agent("tn-a", &fleet, "2G", true);
    let b = agent("tn-b", &fleet, "2G", true);
    // A guest rewriting its memory: at 50 MiB/s its migration takes
    // several times as long as uncapped on loopback.
    a.create_vm("vm1", "512M", "dirty:16:20:256");
    let before = a.heartbeat("vm1");
    let cap: u64 = 50 << 20;
    let body = json!({"target": {"host": host(&b), "address": peer_addr(&b)}, "bandwidth": cap});
    let r = a.post("/v1/vms/vm1/migrations", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();

    assert_eq!(patch(&a, "no-such-job", r#"{"bandwidth": 0}"#).status, 404);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = a.get(&format!("/v1/migrations/{id}")).json();
        if v["progress"]["round"] == 1 && v["progress"]["sent_mib"].as_f64().unwrap_or(0.0) > 1.0 {
            break;
        }
        assert!(v["phase"] != "committed" && v["phase"] != "failed", "{v}");
        assert!(Instant::now() < deadline, "no first pass: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }

    for bad in [
        "{}",
        "",
        r#"{"downtime_ms": -1}"#,
        r#"{"downtime_ms": NaN}"#,
        r#"{"bandwidth": -5}"#,
        r#"{"mode": "precopy"}"#,
        r#"{"bandwidth": 0, "speed": 1}"#,
    ] {
        let r = patch(&a, &id, bad);
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        assert!(r.json()["reason"].is_string(), "{}", r.text());
    }
    let refused = patch(&a, &id, r#"{"mode": "postcopy"}"#);
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert!(
        refused.text().contains("allow_postcopy"),
        "{}",
        refused.text()
    );
    // Nothing changed: still the capped first pass.
    let v = a.get(&format!("/v1/migrations/{id}")).json();
    assert_eq!(v["phase"], "transferring", "{v}");
    assert_eq!(v["progress"]["round"], 1, "{v}");

    let out = Command::new(ferry_bin())
        .args([
            "migration",
            "tune",
            &id,
            "--bandwidth",
            "unlimited",
            "--downtime",
            "50ms",
            "--json",
            "--agent",
        ])
        .arg(&a.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "ferry migration tune: {out:?}");
    // The engine's last word before the tune took effect: what was sent
    // by then went at the cap (a line up to 100 ms old only makes the
    // rate after look lower).
    let tuned = a.get(&format!("/v1/migrations/{id}")).json();
    assert_eq!(tuned["downtime_target_ms"], 50.0, "{tuned}");
    assert!(tuned["bandwidth_cap"].is_null(), "uncapped: {tuned}");
    let mib = f64::from(1u32 << 20);
    let sent_at_tune = tuned["progress"]["sent_mib"].as_f64().unwrap_or(0.0) * mib;
    let ms_at_tune = tuned["progress"]["elapsed_ms"].as_f64().unwrap_or(0.0);

    let done = wait_job(&a, &id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    let total_ms = done["report"]["total_ms"].as_f64().unwrap();
    let sent = done["report"]["bytes_sent"].as_u64().unwrap() as f64;
    let rate_after = (sent - sent_at_tune) / ((total_ms - ms_at_tune).max(1.0) / 1e3);
    eprintln!(
        "tuned migration: {:.1} MiB sent in {total_ms:.0} ms, {:.1} MiB of it after the tune at {:.0} MiB/s; the cap was 50 MiB/s",
        sent / mib,
        (sent - sent_at_tune) / mib,
        rate_after / mib
    );
    assert!(
        rate_after > 2.0 * cap as f64,
        "not faster than the cap after the tune ({:.0} MiB/s): {done}",
        rate_after / mib
    );
    let hb = b.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");

    let ended = patch(&a, &id, r#"{"bandwidth": 1048576}"#);
    assert_eq!(ended.status, 409, "{}", ended.text());
    assert!(ended.text().contains("committed"), "{}", ended.text());

    let audit = a.audit_lines();
    let patches: Vec<&Value> = audit
        .iter()
        .filter(|l| l["action"] == "PATCH /v1/migrations/{id}")
        .collect();
    assert!(
        patches
            .iter()
            .any(|l| l["outcome"] == "ok" && l["vm"] == "vm1"),
        "{audit:?}"
    );
    assert!(patches.iter().any(|l| l["status"] == 422), "{audit:?}");
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn a_capped_precopy_switched_to_postcopy_by_the_operator_follows_a_new_cap_and_commits_verified() {
    if !kvm_or_skip("a_capped_precopy_switched_to_postcopy_by_the_operator_follows_a_new_cap") {
        return;
    }
    let fleet = Fleet::new("tunepc");
    let a = agent("tp-a", &fleet, "2G", true);
    let b = agent("tp-b", &fleet, "2G", true);
    let r = a.post(
        "/v1/vms",
        Some(json!({"id": "vm1", "definition": {"mem_bytes": 512u64 << 20, "workload": "dirty:16:20:64"}, "policy": {"allow_postcopy": true}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let before = a.heartbeat("vm1");
    // Slow enough that post-copy's push, at the cap, takes seconds. The
    // switch comes after the first pass, about 80 MiB here (64 MiB filled):
    // some 10 s at this cap (with 256 MiB filled it took 34 s).
    let cap: u64 = 8 << 20;
    let body = json!({"target": {"host": host(&b), "address": peer_addr(&b)}, "bandwidth": cap});
    let r = a.post("/v1/vms/vm1/migrations", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let job_until = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = a.get(&format!("/v1/migrations/{id}")).json();
            if done(&v) {
                return;
            }
            assert!(
                v["phase"] != "committed" && v["phase"] != "failed",
                "before {what}: {v}"
            );
            assert!(Instant::now() < deadline, "no {what}: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    job_until("first pass", &|v| {
        v["progress"]["round"] == 1 && v["progress"]["sent_mib"].as_f64().unwrap_or(0.0) > 1.0
    });
    let r = patch(&a, &id, r#"{"mode": "postcopy"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    job_until("post-copy", &|v| v["progress"]["phase"] == "postcopy");
    // Post-copy's push follows a new cap too.
    let r = patch(&a, &id, r#"{"bandwidth": 0}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let done = wait_job(&a, &id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    let postcopy = &done["report"]["postcopy"];
    let pushed = postcopy["pushed_pages"].as_u64().expect("pushed_pages") * 4096;
    let served_ms = postcopy["duration_ms"].as_f64().expect("duration_ms");
    let at_cap_ms = pushed as f64 / cap as f64 * 1e3;
    eprintln!(
        "post-copy pushed {:.1} MiB in {served_ms:.0} ms; at the 8 MiB/s cap: {at_cap_ms:.0} ms",
        pushed as f64 / f64::from(1u32 << 20)
    );
    assert!(
        at_cap_ms > 1000.0 && served_ms < at_cap_ms * 0.5,
        "post-copy did not follow the lifted cap: {postcopy}"
    );
    let hb = b.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}

#[test]
fn a_retune_while_preparing_is_kept_shown_and_the_engine_starts_with_it() {
    if !kvm_or_skip("a_retune_while_preparing_is_kept_shown_and_the_engine_starts_with_it") {
        return;
    }
    let fleet = Fleet::new("tuneprep");
    let a = agent("tq-a", &fleet, "2G", true);
    // The destination's receiver takes a second to start: the job sits in
    // its preparing phase meanwhile.
    let id_dir = fleet.issue("test-tq-b");
    let extra = format!(
        "tls_dir = \"{}\"\ninsecure_plaintext_data_plane = true\n",
        id_dir.display()
    );
    let slow = fleet.dir.path("slow-ferry");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 1\nexec {} \"$@\"\n",
            ferry_bin().display()
        ),
    )
    .unwrap();
    let chmod = Command::new("chmod")
        .arg("755")
        .arg(&slow)
        .status()
        .unwrap();
    assert!(chmod.success());
    let b = Agent::with_extra("tq-b", "2G", 4, Some(&slow), &extra, |_| {});
    a.create_vm("vm1", "256M", "dirty:16:20:64");
    let before = a.heartbeat("vm1");
    // At 4 MiB/s the first pass alone would take about 20 s.
    let cap: u64 = 4 << 20;
    let body = json!({"target": {"host": host(&b), "address": peer_addr(&b)}, "bandwidth": cap, "downtime_ms": 300.0});
    let r = a.post("/v1/vms/vm1/migrations", Some(body));
    assert_eq!(r.status, 202, "{}", r.text());
    let started = r.json();
    let id = started["id"].as_str().unwrap().to_owned();
    assert_eq!(started["bandwidth_cap"], cap, "{started}");
    assert_eq!(started["downtime_target_ms"], 300.0, "{started}");

    let r = patch(&a, &id, r#"{"bandwidth": 0, "downtime_ms": 40}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let tuned = r.json();
    assert_eq!(
        tuned["phase"], "preparing",
        "the retune came too late to test: {tuned}"
    );
    assert!(tuned["bandwidth_cap"].is_null(), "{tuned}");
    assert_eq!(tuned["downtime_target_ms"], 40.0, "{tuned}");
    // Post-copy is this VM's policy's to refuse, preparing or not.
    let refused = patch(&a, &id, r#"{"mode": "postcopy"}"#);
    assert_eq!(refused.status, 422, "{}", refused.text());

    let done = wait_job(&a, &id, Duration::from_secs(120));
    assert_eq!(done["phase"], "committed", "{done}");
    assert!(done["bandwidth_cap"].is_null(), "{done}");
    assert_eq!(done["downtime_target_ms"], 40.0, "{done}");
    // The engine itself started with the new settings.
    let report = &done["report"];
    assert_eq!(report["downtime_target_ms"], 40.0, "{report}");
    assert!(report["bandwidth_limit"].is_null(), "{report}");
    let sent = report["bytes_sent"].as_u64().unwrap() as f64;
    let at_cap_ms = sent / cap as f64 * 1e3;
    let total_ms = report["total_ms"].as_f64().unwrap();
    eprintln!(
        "retuned while preparing: {total_ms:.0} ms; at the old cap at least {at_cap_ms:.0} ms"
    );
    assert!(total_ms < at_cap_ms / 4.0, "not uncapped: {report}");
    let hb = b.heartbeat_after(
        "vm1",
        before["seq"].as_u64().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(hb["err"], 0, "{hb}");
    assert_eq!(hb["sequence_breaks"], 0, "{hb}");
    assert_eq!(reserved(&a, "ferryd_memory_reserved_bytes"), 0);
    assert_eq!(b.delete("/v1/vms/vm1").status, 200);
}
