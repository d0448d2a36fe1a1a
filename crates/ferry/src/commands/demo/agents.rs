//! `ferry demo` between two agents: the VM is created on host A's
//! `ferryd` by its API, migrated to host B's by a migration job, and
//! verified from the consoles both agents log.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_agent::migration::JobPhase;
use ferry_testguest::console::{parse_line, Line};
use serde_json::{json, Value};

use super::hosts::{DemoHost, DemoHosts};
use super::log_tail::LogTail;
use super::{conclude, finish, say, verify_destination, DemoArgs, DemoReport};
use crate::commands::migration::follow;
use crate::report::print_migration_report;
use crate::size::show_size;

/// The VM's id on both hosts.
const VM_ID: &str = "demo";
/// How long the guest on A has to boot and finish its first sweeps.
const SOURCE_WINDOW: Duration = Duration::from_secs(60);

pub(super) fn demo(args: &DemoArgs) -> anyhow::Result<bool> {
    let start = Instant::now();
    let hosts = DemoHosts::start(args.vm.mem, args.vm.vcpus())?;
    let mut doc = DemoReport::new(args, hosts.describe());
    say!(args.json, "Hosts: {}", hosts.describe());
    say!(
        args.json,
        "Host A: ferryd boots a {} vCPU VM with {} of memory, workload {} ...",
        args.vm.vcpus(),
        show_size(args.vm.mem),
        args.vm.workload()
    );
    let definition = json!({
        "mem_bytes": args.vm.mem,
        "vcpus": args.vm.vcpus(),
        "workload": args.vm.workload().to_string(),
        "prealloc": args.vm.prealloc,
    });
    let created = call(
        &hosts.a,
        "POST",
        "/v1/vms",
        Some(json!({"id": VM_ID, "definition": definition})),
    )?;
    let log_path = created["log"]
        .as_str()
        .context("ferryd's answer to POST /v1/vms names no console log")?;
    let mut source_log = LogTail::open(log_path.as_ref(), Duration::from_secs(10))
        .with_context(|| format!("cannot read the VM's console log {log_path}"))?;

    let source = watch_source(&mut source_log, args.sweeps, start, args.verbose);
    doc.source_ready_ms = source.ready_ms;
    doc.source_errors = source.errors;
    doc.source_last_seq = source.last_seq;
    if let Some(why) = source.failure {
        let why = format!(
            "Demo FAILED before the migration: {why}; host A: {}",
            hosts.a.log_tail(3)
        );
        return finish(doc, false, why, args.json);
    }
    say!(
        args.json,
        "Host A: guest READY after {:.0} ms, {} full sweep(s) verified; last heartbeat seq {}",
        source.ready_ms.unwrap_or_default(),
        source.sweeps,
        source.last_seq.unwrap_or_default()
    );
    say!(
        args.json,
        "Live-migrating A -> B by ferryd's API (downtime target {:?}) ...",
        args.downtime
    );
    let body = json!({
        "target": {"host": hosts.b.name, "address": hosts.b.peer_addr},
        "mode": "precopy",
        "downtime_ms": args.downtime.as_secs_f64() * 1e3,
    });
    let started = call(
        &hosts.a,
        "POST",
        &format!("/v1/vms/{VM_ID}/migrations"),
        Some(body),
    )?;
    let job_id = started["id"]
        .as_str()
        .context("the migration job has no id")?;
    let job = follow(&hosts.a.client, job_id, !args.json)?;
    say!(args.json, "Transport: {}", job.transport);
    // Heartbeats host A's guest printed up to the pause.
    let mut last_src_seq = source.last_seq.unwrap_or_default();
    for line in source_log.drain() {
        if let Line::Heartbeat(hb) = parse_line(&line) {
            last_src_seq = hb.seq;
            doc.source_errors = doc.source_errors.max(hb.err);
        }
    }
    doc.source_last_seq = Some(last_src_seq);
    if let Some(report) = &job.report {
        if !args.json {
            print_migration_report(report);
        }
        doc.migration = Some(Box::new(report.clone()));
    }
    if job.phase != JobPhase::Committed {
        let why = format!(
            "Demo FAILED: the migration job ended {}: {}",
            job.phase.as_str(),
            job.error.as_deref().unwrap_or("no reason given")
        );
        return finish(doc, false, why, args.json);
    }
    if let Some(why) = still_on(&hosts.a) {
        return finish(doc, false, format!("Demo FAILED: {why}"), args.json);
    }
    let on_b = call(&hosts.b, "GET", &format!("/v1/vms/{VM_ID}"), None)?;
    let b_log = on_b["log"]
        .as_str()
        .context("host B's record of the VM names no console log")?;
    let mut dest_log = LogTail::open(b_log.as_ref(), Duration::from_secs(10))
        .with_context(|| format!("cannot read host B's console log {b_log}"))?;
    let verdict = verify_destination(
        |left| dest_log.next_line(left),
        || hosts.b.log_tail(3),
        last_src_seq,
        None,
        args.verbose,
        args.json,
    );
    let errors = doc.source_errors;
    conclude(doc, verdict, last_src_seq, errors, None, args.json)
}

/// One API call that must succeed; its JSON answer.
fn call(host: &DemoHost, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let reply = host
        .client
        .request(method, path, body.as_ref())
        .with_context(|| format!("{method} {path} on {}", host.name))?;
    if !reply.is_success() {
        let answer = reply.json();
        bail!(
            "{method} {path} on {} answered {}: {}",
            host.name,
            reply.status,
            answer["reason"].as_str().unwrap_or(&reply.text())
        );
    }
    Ok(reply.json())
}

/// Why host A still has the VM after the commit, if it does.
fn still_on(a: &DemoHost) -> Option<String> {
    match a.client.get(&format!("/v1/vms/{VM_ID}")) {
        Ok(r) if r.status == 404 => None,
        Ok(r) => Some(format!(
            "host A still lists the VM after the commit ({} {})",
            r.status,
            r.text()
        )),
        Err(e) => Some(format!(
            "host A's agent did not answer after the commit: {e}"
        )),
    }
}

/// What host A's console showed before the migration.
struct SourceWatch {
    ready_ms: Option<f64>,
    sweeps: u64,
    last_seq: Option<u64>,
    errors: u64,
    failure: Option<String>,
}

/// Reads host A's console until the guest is READY with `sweeps` full
/// sweeps verified, or something went wrong.
fn watch_source(log: &mut LogTail, sweeps: u64, start: Instant, verbose: bool) -> SourceWatch {
    let deadline = Instant::now() + SOURCE_WINDOW;
    let mut w = SourceWatch {
        ready_ms: None,
        sweeps: 0,
        last_seq: None,
        errors: 0,
        failure: None,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = log.next_line(left) else {
            w.failure = Some(format!(
                "the guest was not READY with {sweeps} sweep(s) within {} s",
                SOURCE_WINDOW.as_secs()
            ));
            return w;
        };
        if verbose {
            eprintln!("A: {line}");
        }
        match parse_line(&line) {
            Line::Ready(_) if w.ready_ms.is_none() => {
                w.ready_ms = Some(start.elapsed().as_secs_f64() * 1e3)
            }
            Line::Heartbeat(hb) => {
                w.last_seq = Some(hb.seq);
                w.errors = hb.err;
                w.sweeps = hb.sweeps;
                if hb.err > 0 {
                    w.failure = Some(format!("{} pages failed verification on A", hb.err));
                    return w;
                }
                if w.ready_ms.is_some() && hb.sweeps >= sweeps {
                    return w;
                }
            }
            Line::PageError(e) => {
                w.failure = Some(format!("the guest found a bad page at {:#x}", e.addr));
                return w;
            }
            Line::Exit(e) => {
                w.failure = Some(format!("the guest exited (code {}: {})", e.code, e.reason));
                return w;
            }
            _ => {}
        }
    }
}
