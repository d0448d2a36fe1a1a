//! The fleet's web page on real agents: two ferryd register in one store
//! file, a VM runs on the first, `ferry fleet serve --web` serves the
//! page while it drains that host, and once the drain is done headless
//! chromium shows the VM on the other host, the plan done, and the
//! finished migration's plot drawn from the report the source agent
//! keeps (one bar per round it reported). The page is polled while the
//! migration runs too; whether it caught the migration in flight depends
//! on timing (a 64 MiB guest moves in well under a second), so that is
//! printed, not asserted.

#[path = "../../ferry/tests/common/browser.rs"]
mod browser;
mod common;
#[path = "../../fleet/tests/common/store_waits.rs"]
mod store_waits;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use browser::{chromium_or_skip, dump_dom, http, screenshot, wait_addr_file, Proc};
use common::peers::{agent_with, host, Fleet};
use common::{kvm_or_skip, TempDir};
use ferry_fleet::plan::{EntryState, Plan, PlanState};
use ferry_fleet::store::shared_file::SharedFileBackend;
use store_waits::{run_shown, wait_plan_done, wait_registered};

const VM: &str = "fw-v1";

fn fleet_table(store: &Path, rack: &str) -> String {
    format!(
        "[fleet]\nstore = \"{}\"\nlease_ttl_s = 5\nlabels = {{ rack = \"{rack}\", zone = \"z1\" }}\n",
        store.display()
    )
}

fn fleet_json(addr: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/api/fleet");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("the fleet as JSON")
}

#[test]
fn the_page_plots_a_real_agents_finished_migration() {
    if !kvm_or_skip("the_page_plots_a_real_agents_finished_migration") {
        return;
    }
    let Some(chromium) = chromium_or_skip("the_page_plots_a_real_agents_finished_migration") else {
        return;
    };
    let dir = TempDir::new("fleet-web");
    let store = dir.path("fleet.redb");
    let ca = Fleet::new("fleet-web");
    let a = agent_with("fwa", &ca, "2G", false, &fleet_table(&store, "r1"));
    let b = agent_with("fwb", &ca, "1G", false, &fleet_table(&store, "r2"));
    a.create_vm(VM, "64M", "dirty:16:50");
    let backend = SharedFileBackend::open(&store).unwrap();
    let names = [host(&a), host(&b)];
    wait_registered(&backend, &names, &[VM], &names[0], Duration::from_secs(30));

    let addr_file = dir.path("web.addr");
    let _serve = Proc::spawn(
        Command::new(common::ferry_bin())
            .args(["fleet", "serve", "--store-file"])
            .arg(&store)
            .args(["--name", "web-agents", "--lease-ttl-s", "3"])
            .args(["--tick-ms", "200", "--for-s", "300"])
            .args(["--web", "127.0.0.1:0", "--web-addr-file"])
            .arg(&addr_file)
            .stdin(Stdio::null()),
    );
    let addr = wait_addr_file(&addr_file, Duration::from_secs(30));
    let url = format!("http://{addr}/");

    let out = run_shown(
        Command::new(common::ferry_bin())
            .args(["host", "drain", &names[0], "--json", "--store-file"])
            .arg(&store)
            .stdin(Stdio::null()),
    );
    assert!(out.status.success(), "the drain did not start");
    let plan: Plan = serde_json::from_slice(&out.stdout).expect("the plan as JSON");
    let mut caught_in_flight = None;
    let done = wait_plan_done(
        &backend,
        &plan.id,
        Duration::from_secs(180),
        "the drain never ended",
        |_| {
            if caught_in_flight.is_none() {
                let v = fleet_json(&addr);
                caught_in_flight = v["migrations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["progress"].is_object() && m["report"].is_null())
                    .cloned();
            }
        },
    );
    let EntryState::Migrated { target, .. } = &done.entries[0].state else {
        panic!("{VM} did not migrate: {:?}", done.entries[0]);
    };
    assert_eq!(*target, names[1]);
    match &caught_in_flight {
        Some(m) => println!("caught in flight: {}", m["progress"]),
        None => println!("the migration ended between two polls of the page"),
    }

    // The agent's report, as the page has it.
    let start = Instant::now();
    let migration = loop {
        let v = fleet_json(&addr);
        let m = v["migrations"].as_array().unwrap().first().cloned();
        if let Some(m) = m.filter(|m| m["phase"] == "committed" && m["report"].is_object()) {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the page never showed the finished migration: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rounds = migration["report"]["rounds"].as_array().unwrap().len();
    assert!(rounds >= 1, "{migration}");
    assert_eq!(migration["vm"], VM);
    assert_eq!(migration["source"], names[0].as_str());
    let id = migration["id"].as_str().unwrap();
    println!(
        "{id}: {rounds} rounds, {} bytes in {} ms",
        migration["report"]["bytes_sent"], migration["report"]["total_ms"]
    );

    let profile = dir.path("chromium-profile");
    let dom = dump_dom(&chromium, &profile, &url);
    for h in &names {
        assert!(
            dom.contains(&format!(r#"data-host="{h}""#)),
            "{h} not shown"
        );
    }
    let vm_row = dom
        .split(&format!(r#"<tr class="vm" data-vm="{VM}">"#))
        .nth(1)
        .expect("the VM's row")
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        vm_row.contains(&format!("<td>{}</td>", names[1])),
        "{vm_row}"
    );
    assert!(dom.contains(&format!(r#"data-plan="{}" data-state="done""#, plan.id)));
    assert!(dom.contains(">migrated</span>"));
    let fig = dom
        .split(&format!(
            r#"<figure class="migration" data-migration="{id}">"#
        ))
        .nth(1)
        .expect("the finished migration's figure")
        .split("</figure>")
        .next()
        .unwrap();
    assert!(fig.contains(">committed</span>"), "{fig}");
    assert!(
        fig.contains("<svg") && fig.contains(r#"class="sent""#),
        "{fig}"
    );
    assert_eq!(fig.matches(r#"<rect class="bar"#).count(), rounds, "{fig}");
    screenshot(&chromium, &profile, &url, &dir.path("fleet.png"));
    assert_eq!(done.state, PlanState::Done);
}
