//! `ferry fleet serve --web` in a real headless browser: a store file
//! filled here (hosts alive, lapsed and never registered, VMs, a refused
//! drain with its reasons and a draft), an agent's API faked on a Unix
//! socket that knows one finished migration (its report, rounds and
//! timeline) and one in flight, and chromium's rendering of the page:
//! its DOM names every host and VM, the plans' states and a reason, the
//! progress of the migration in flight and a plot of the finished one,
//! escapes a tenant's name full of markup, and its screenshot is a PNG of
//! the window's size. The page's server answers only GET and HEAD, and
//! asks the agent only GETs.
//!
//! Without chromium the test says SKIPPED loudly and passes
//! (scripts/setup.sh installs Debian's `chromium`).

#[path = "common/browser.rs"]
mod browser;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use browser::{chromium_or_skip, dump_dom, http, run_bounded, screenshot, wait_addr_file, Proc};

use ferry_agent::events::Caller;
use ferry_agent::fleet_migrator::{JobRecord, JOBS};
use ferry_agent::migration::{JobPhase, JobProgress, MigrationJob, MigrationTarget};
use ferry_fleet::agents::{put_endpoint, AgentEndpoint};
use ferry_fleet::hosts;
use ferry_fleet::model::{
    Availability, Health, Host, Maintenance, MigrationPolicy, Resources, Tenant, Version, Vm,
    VmRunState, GIB, MIB,
};
use ferry_fleet::plan::{Plan, PlanState};
use ferry_fleet::policy::Policies;
use ferry_fleet::store::fleet_store::Batch;
use ferry_fleet::store::shared_file::SharedFileBackend;
use ferry_fleet::store::{Expect, FleetStore};
use ferry_fleet::time::Timestamp;
use ferry_migration::stats::{BlackoutReport, MigrationReport, RoundReport};

/// A tenant whose name is markup: the page must show it as text.
const TENANT: &str = "acme <b>&</b> 'co\"";

/// The test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn host(name: &str, mem_gib: u64, vcpus: u32, health: Health) -> Host {
    Host {
        name: name.into(),
        capacity: Resources::new(mem_gib * GIB, vcpus),
        labels: [("rack".to_string(), format!("r-{name}"))].into(),
        health,
        version: Version::new(1, 4),
        cpu_features: Default::default(),
        maintenance: Maintenance::None,
        link_bytes_per_sec: 1_250_000_000,
        receive_setup: None,
        send_setup_ms: None,
    }
}

fn vm(id: &str, on: &str, mem_gib: u64) -> Vm {
    Vm {
        id: id.into(),
        tenant: TENANT.into(),
        host: on.into(),
        resources: Resources::new(mem_gib * GIB, 2),
        populated_bytes: mem_gib * GIB / 2,
        dirty_rate: 16 * MIB,
        availability: Availability::default(),
        migration: MigrationPolicy::default(),
        anti_affinity: Default::default(),
        cpu_features: Default::default(),
        state: VmRunState::Running,
    }
}

/// What the fake agent knows: a committed migration with its report,
/// and one transferring.
fn jobs() -> Vec<MigrationJob> {
    let rounds: Vec<RoundReport> = [(64u64, 310.0, 48.0), (21, 105.0, 31.0), (6, 30.0, 22.0)]
        .iter()
        .enumerate()
        .map(|(i, &(mib, ms, dirty))| RoundReport {
            round: i as u32 + 1,
            bytes_sent: mib * MIB,
            duration_ms: ms,
            dirty_rate_mibs: dirty,
            blackout: i == 2,
            ..Default::default()
        })
        .collect();
    let timeline: Vec<(f64, u64)> = (0..=45)
        .map(|i| {
            let t = f64::from(i) * 10.0;
            (t, ((91.0 * MIB as f64) * (t / 450.0).sqrt()) as u64)
        })
        .collect();
    let job = |id: &str, vm: &str, phase: JobPhase| MigrationJob {
        id: id.into(),
        vm: vm.into(),
        source: "h-a".into(),
        target: MigrationTarget {
            host: "h-b".into(),
            address: "127.0.0.1:1".into(),
        },
        phase,
        transport: "tls1.3".into(),
        mode: "precopy".into(),
        downtime_target_ms: None,
        bandwidth_cap: None,
        destination_migration: None,
        data_plane: None,
        progress: None,
        last_progress: None,
        progress_lines: 0,
        report: None,
        error: None,
        destination_told: None,
        destination_note: None,
        requested_by: Caller::Local {
            uid: 0,
            gid: 0,
            pid: None,
        },
        started_at: "2026-12-04T18:00:00Z".into(),
        ended_at: None,
    };
    let mut done = job("job-done", "v-4", JobPhase::Committed);
    done.report = Some(MigrationReport {
        mode: "precopy".into(),
        outcome: "committed".into(),
        mem_bytes: 64 * MIB,
        total_ms: 460.0,
        bytes_sent: 91 * MIB,
        rounds,
        timeline,
        blackout: BlackoutReport {
            host_downtime_ms: 7.5,
            ..Default::default()
        },
        ..Default::default()
    });
    let mut running = job("job-run", "v-1", JobPhase::Transferring);
    running.progress = Some(JobProgress {
        phase: "round".into(),
        round: 2,
        mib_left: 12.0,
        sent_mib: 36.0,
        dirty_rate_mibs: 18.5,
        throughput_mibs: 950.0,
        throttle_percent: 0,
        predicted_downtime_ms: None,
        eta_ms: None,
        elapsed_ms: 1200.0,
        message: None,
    });
    vec![done, running]
}

/// An agent's API on a Unix socket that answers `GET /v1/migrations/ID`
/// from [`jobs`], 404 otherwise, and records each request line. Stops
/// on drop.
struct FakeAgent {
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn answer(stream: &mut std::os::unix::net::UnixStream, seen: &Mutex<Vec<String>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or_default().to_string();
    seen.lock().unwrap().push(line.clone());
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let job = path
        .strip_prefix("/v1/migrations/")
        .and_then(|id| jobs().into_iter().find(|j| j.id == id));
    let (status, body) = match (method, job) {
        ("GET", Some(j)) => ("200 OK", serde_json::to_string(&j).unwrap()),
        _ => (
            "404 Not Found",
            r#"{"error":"not_found","reason":"no such job"}"#.into(),
        ),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl FakeAgent {
    fn start(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        answer(&mut s, &seen);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fleet this test shows: h-a (alive, three VMs), h-b (never
/// registered, one VM), h-c (its lease lapsed, unreachable); h-a's agent
/// endpoint is the fake agent's socket, and the migrator's records name
/// the fake agent's two jobs.
fn fill(b: &SharedFileBackend, socket: &Path) {
    let now = Timestamp::now_wall();
    let hosts_ = [
        host("h-a", 16, 16, Health::Healthy),
        host("h-b", 8, 8, Health::Healthy),
        host("h-c", 8, 4, Health::Unreachable { since: now }),
    ];
    let vms = [
        vm("v-1", "h-a", 4),
        vm("v-2", "h-a", 4),
        vm("v-3", "h-a", 4),
        vm("v-4", "h-b", 2),
    ];
    let tenants = [Tenant {
        name: TENANT.into(),
        max_concurrent_migrations: None,
    }];
    let fleet = FleetStore::new(b);
    fleet
        .seed(&hosts_, &vms, &tenants, &Policies::default())
        .unwrap();
    hosts::register(b, &hosts_[0], 600_000).unwrap();
    let lapsed = hosts::register(b, &hosts_[2], 600_000).unwrap();
    hosts::deregister(b, &lapsed).unwrap();
    let mut batch = Batch::default();
    put_endpoint(
        &mut batch,
        &AgentEndpoint {
            host: "h-a".into(),
            socket: socket.to_owned(),
            peer_address: None,
            agent_version: "test".into(),
        },
    )
    .unwrap();
    for (name, vm, job, ago) in [
        ("mig-done", "v-4", "job-done", 60_000),
        ("mig-run", "v-1", "job-run", 2_000),
    ] {
        let rec = JobRecord {
            vm: vm.into(),
            source: "h-a".into(),
            target: "h-b".into(),
            started: Timestamp(now.ms() - ago),
            job: Some(job.into()),
        };
        batch
            .put(format!("{JOBS}{name}"), &rec, Expect::Absent)
            .unwrap();
    }
    fleet.commit(batch, None).unwrap();
}

/// `ferry host drain HOST --dry-run --json` on the store: the plan it stored.
fn drain_dry_run(store: &Path, host: &str) -> Plan {
    let (_, out) = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["host", "drain", host, "--dry-run", "--json", "--store-file"])
            .arg(store)
            .stderr(Stdio::inherit()),
        Duration::from_secs(60),
    );
    serde_json::from_slice(&out).expect("the plan as JSON")
}

#[test]
fn the_fleet_page_renders_in_a_headless_browser_and_is_read_only() {
    let Some(chromium) = chromium_or_skip("the_fleet_page_renders_in_a_headless_browser") else {
        return;
    };
    let dir = TempDir::new("fleet-web");
    let store = dir.path("fleet.redb");
    let socket = dir.path("agent.sock");
    let agent = FakeAgent::start(&socket);
    let b = SharedFileBackend::open(&store).unwrap();
    fill(&b, &socket);

    // Two plans: h-a's three 4 GiB VMs have room nowhere but h-b (6 GiB
    // free), so its drain is refused with reasons; h-b's one VM fits on h-a.
    let refused = drain_dry_run(&store, "h-a");
    assert_eq!(refused.state, PlanState::Refused, "{refused:?}");
    let reason = refused
        .entries
        .iter()
        .find_map(|e| e.reason.clone())
        .expect("a blocked entry says why");
    let draft = drain_dry_run(&store, "h-b");
    assert_eq!(draft.state, PlanState::Draft, "{draft:?}");

    let addr_file = dir.path("web.addr");
    let _serve = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["fleet", "serve", "--store-file"])
            .arg(&store)
            .args(["--name", "web-test", "--tick-ms", "200", "--for-s", "120"])
            .args(["--web", "127.0.0.1:0", "--web-addr-file"])
            .arg(&addr_file)
            .stdin(Stdio::null()),
    );
    let addr = wait_addr_file(&addr_file, Duration::from_secs(30));
    let url = format!("http://{addr}/");
    println!("the page: {url}");

    // Read-only: every other method is refused, on the page's paths and
    // any other.
    for (method, path) in [
        ("POST", "/"),
        ("PUT", "/api/fleet"),
        ("DELETE", "/api/fleet"),
        ("PATCH", "/plans/x"),
    ] {
        let (status, _) = http(&addr, method, path);
        assert_eq!(status, 405, "{method} {path}");
    }
    assert_eq!(http(&addr, "GET", "/nothing-here").0, 404);
    let asked = std::time::Instant::now();
    let (status, body) = http(&addr, "GET", "/api/fleet");
    assert_eq!(status, 200);
    println!("GET /api/fleet took {:?}", asked.elapsed());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["vms"].as_array().unwrap().len(), 4);
    assert_eq!(v["plans"].as_array().unwrap().len(), 2);
    let lease = |h: &str| {
        v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == h)
            .unwrap()["lease"]
            .clone()
    };
    assert_eq!(lease("h-a"), "alive");
    assert_eq!(lease("h-b"), "unregistered");
    assert_eq!(lease("h-c"), "lapsed");
    let m = v["migrations"].as_array().unwrap();
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[0]["id"], "mig-run", "newest first");
    assert_eq!(m[0]["phase"], "transferring");
    assert_eq!(m[1]["report"]["rounds"].as_array().unwrap().len(), 3);

    let profile = dir.path("chromium-profile");
    let dom = dump_dom(&chromium, &profile, &url);
    assert!(dom.contains("<h1>Ferry fleet</h1>"), "{dom}");
    for name in ["h-a", "h-b", "h-c", "v-1", "v-2", "v-3", "v-4"] {
        assert!(dom.contains(&format!(">{name}</td>")), "{name} not shown");
    }
    assert!(dom.contains(r#"data-host="h-c""#));
    assert!(dom.contains(">unreachable</span>") && dom.contains(">lapsed</span>"));
    assert!(dom.contains(">unregistered</span>") && dom.contains(">alive</span>"));
    for p in [&refused, &draft] {
        let state = format!("{:?}", p.state).to_lowercase();
        assert!(
            dom.contains(&format!(r#"data-plan="{}" data-state="{state}""#, p.id)),
            "plan {} as {state}",
            p.id
        );
    }
    let shown_reason = reason
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    assert!(
        dom.contains(&shown_reason),
        "the reason {reason:?} not shown"
    );
    assert!(dom.contains(">blocked</span>"));
    // The migration in flight, with its progress.
    assert!(dom.contains(r#"data-migration="mig-run""#));
    assert!(dom.contains("36.0 MiB") && dom.contains("<progress"));
    // The finished one, plotted.
    let fig = dom
        .split(r#"<figure class="migration" data-migration="mig-done">"#)
        .nth(1)
        .expect("the finished migration's figure");
    let svg = fig.split("</figure>").next().unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("class=\"sent\""),
        "{svg}"
    );
    assert_eq!(svg.matches("<rect class=\"bar").count(), 3, "{svg}");
    // The tenant's markup is text, never elements.
    assert!(
        dom.contains("acme &lt;b&gt;&amp;&lt;/b&gt; 'co\""),
        "tenant escaped"
    );
    assert!(!dom.contains("acme <b>"));

    screenshot(&chromium, &profile, &url, &dir.path("fleet.png"));

    // The page asked the agent only GETs, of the two jobs.
    let seen = agent.requests.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for r in &seen {
        assert!(
            r.starts_with("GET /v1/migrations/job-done ")
                || r.starts_with("GET /v1/migrations/job-run "),
            "{r}"
        );
    }
}
