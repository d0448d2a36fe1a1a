//! `ferry fleet serve` and `ferry fleet host` as processes against a real
//! etcd on loopback: one of two serves leads, the other takes over when
//! the leader is killed; a registered host's lease lapses when its
//! process dies; bad input is refused with a clear error; an operator's
//! `ferry host drain` written while a serve leads is carried out by it.

#[path = "../../fleet/tests/common/etcd.rs"]
mod etcd;
#[path = "../../fleet/tests/common/store_waits.rs"]
mod store_waits;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use etcd::EtcdServer;
use ferry_fleet::hosts;
use ferry_fleet::leader;
use ferry_fleet::store::etcd::{EtcdBackend, DEFAULT_PREFIX};
use store_waits::{run_shown, wait_for, wait_plan_done, wait_registered};

/// A child process killed on drop, a failing test's included.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.args(args).stdin(Stdio::null());
    c
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        ferry(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferry"),
    )
}

fn run(args: &[&str]) -> Output {
    ferry(args).output().expect("run ferry")
}

fn leader_name(b: &EtcdBackend) -> Option<String> {
    leader::current(b).ok().flatten().map(|(c, _)| c.name)
}

#[test]
fn a_second_serve_takes_over_when_the_leader_is_killed() {
    let Some(etcd) = EtcdServer::start("fleet_serve_takeover") else {
        return;
    };
    let e = etcd.endpoint.as_str();
    let b = EtcdBackend::connect(e, DEFAULT_PREFIX).unwrap();
    let serve = |name: &str| {
        spawn(&[
            "fleet",
            "serve",
            "--etcd",
            e,
            "--name",
            name,
            "--lease-ttl-s",
            "2",
            "--tick-ms",
            "100",
            "--for-s",
            "60",
        ])
    };
    let mut first = serve("first");
    wait_for("first leads", Duration::from_secs(10), || {
        leader_name(&b).as_deref() == Some("first")
    });
    let _second = serve("second");
    // The second waits while the first lives.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(leader_name(&b).as_deref(), Some("first"));
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let killed = Instant::now();
    wait_for("second takes over", Duration::from_secs(8), || {
        leader_name(&b).as_deref() == Some("second")
    });
    println!(
        "takeover {:?} after the leader was killed (TTL 2 s)",
        killed.elapsed()
    );
}

#[test]
fn a_registered_host_is_listed_and_its_lease_lapses_when_it_dies() {
    let Some(etcd) = EtcdServer::start("fleet_host_register") else {
        return;
    };
    let e = etcd.endpoint.as_str();
    let b = EtcdBackend::connect(e, DEFAULT_PREFIX).unwrap();
    let mut h = spawn(&[
        "fleet",
        "host",
        "register",
        "--etcd",
        e,
        "--name",
        "h1",
        "--mem-gib",
        "64",
        "--vcpus",
        "16",
        "--rack",
        "r1",
        "--lease-ttl-s",
        "2",
        "--for-s",
        "60",
    ]);
    wait_for("h1 registers", Duration::from_secs(10), || {
        hosts::liveness(&b).unwrap().get("h1") == Some(&true)
    });
    // Alive past its TTL: the process keeps the lease.
    std::thread::sleep(Duration::from_secs(3));
    let out = run(&["fleet", "host", "list", "--etcd", e]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("h1 "))
        .expect("h1 listed");
    assert!(
        row.contains("64") && row.contains("r1") && row.contains("alive"),
        "{row}"
    );
    h.0.kill().unwrap();
    h.0.wait().unwrap();
    wait_for("h1's lease lapses", Duration::from_secs(8), || {
        hosts::liveness(&b).unwrap().get("h1") == Some(&false)
    });
    let out = run(&["fleet", "host", "list", "--etcd", e]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("h1 ") && l.contains("lapsed")),
        "{table}"
    );
}

#[test]
fn bad_input_to_serve_and_host_is_a_clear_error() {
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let cases: [(&[&str], &str); 4] = [
        (
            &["fleet", "serve", "--etcd", &nowhere, "--name", "s"],
            "unreachable",
        ),
        (
            &[
                "fleet",
                "serve",
                "--etcd",
                &nowhere,
                "--name",
                "s",
                "--lease-ttl-s",
                "0",
            ],
            "--lease-ttl-s must be 1 to 3600",
        ),
        (
            &[
                "fleet",
                "host",
                "register",
                "--etcd",
                &nowhere,
                "--name",
                "h",
                "--mem-gib",
                "0",
                "--vcpus",
                "1",
            ],
            "--mem-gib and --vcpus must be above 0",
        ),
        (
            &["fleet", "host", "list", "--etcd", &nowhere],
            "unreachable",
        ),
    ];
    for (args, want) in cases {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The operator's flow on etcd: `ferry host drain` (the store chosen as
/// `serve` chooses it) while a serve leads with the simulated migrator. An
/// unknown host is refused and stores nothing; the dry run stores a draft
/// and starts nothing; the drain is picked up by the leader through its
/// watch of the store, and every VM ends on the other host.
#[test]
fn a_drain_written_on_etcd_while_serve_leads_is_carried_out() {
    use ferry_fleet::plan::{EntryState, Plan, PlanState};
    use ferry_fleet::store::FleetStore;

    let Some(etcd) = EtcdServer::start("fleet_serve_drain") else {
        return;
    };
    let e = etcd.endpoint.as_str();
    let b = EtcdBackend::connect(e, DEFAULT_PREFIX).unwrap();
    let register = |name: &str, rack: &str| {
        spawn(&[
            "fleet",
            "host",
            "register",
            "--etcd",
            e,
            "--name",
            name,
            "--mem-gib",
            "64",
            "--vcpus",
            "16",
            "--rack",
            rack,
            "--lease-ttl-s",
            "5",
            "--for-s",
            "120",
        ])
    };
    let _h1 = register("h1", "r1");
    let _h2 = register("h2", "r2");
    wait_registered(&b, &["h1", "h2"], &[], "", Duration::from_secs(10));
    let vms: Vec<_> = ["v1", "v2", "v3"]
        .iter()
        .map(|id| {
            let mut v = ferry_fleet::sim::fixtures::vm(id, "t1", "h1", 1);
            v.cpu_features.clear();
            v
        })
        .collect();
    FleetStore::new(&b)
        .seed(&[], &vms, &[], &Default::default())
        .unwrap();
    let _serve = spawn(&[
        "fleet",
        "serve",
        "--etcd",
        e,
        "--migrator",
        "sim",
        "--name",
        "lead",
        "--tick-ms",
        "100",
        "--for-s",
        "120",
    ]);
    wait_for("the serve leads", Duration::from_secs(10), || {
        leader_name(&b).as_deref() == Some("lead")
    });
    let plans = || FleetStore::new(&b).plan_records().unwrap();
    let drain = |args: &[&str]| {
        let mut all = vec!["host", "drain"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--etcd", e]);
        run_shown(&mut ferry(&all))
    };

    let out = drain(&["h9"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no host or rack h9"),
        "a clear error"
    );
    assert!(plans().is_empty(), "nothing stored");

    let out = drain(&["h1", "--dry-run", "--json"]);
    assert!(out.status.success());
    let dry: Plan = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry.state, PlanState::Draft);
    assert!(dry
        .entries
        .iter()
        .all(|e| e.target.as_deref() == Some("h2") && e.predicted_end_ms.is_some()));
    std::thread::sleep(Duration::from_secs(1));
    let stored = plans();
    assert_eq!(stored.len(), 1);
    assert!(stored[0]
        .plan
        .entries
        .iter()
        .all(|e| e.state == EntryState::Pending));

    let out = drain(&["h1", "--json"]);
    assert!(out.status.success());
    let plan: Plan = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan.state, PlanState::Running);
    let started = Instant::now();
    wait_plan_done(
        &b,
        &plan.id,
        Duration::from_secs(60),
        "the leader carries the drain out",
        |_| {},
    );
    println!(
        "drain on etcd done {:?} after the CLI wrote it (predicted {:?} ms)",
        started.elapsed(),
        plan.predicted_duration_ms
    );
    for v in FleetStore::new(&b).vms().unwrap() {
        assert_eq!(v.value.host, "h2", "{:?}", v.value);
    }
    let out = run(&["fleet", "plans", "--etcd", e]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&plan.id));
}
