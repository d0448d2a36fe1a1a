//! `ferry demo`: boots a VM on "host A" (this process), starts "host B"
//! (a `ferry receive` child process), live-migrates the running VM from A
//! to B over TCP, and shows that the guest on B continued where it was and
//! verified every page of its working set afterwards.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, Heartbeat, Line};
use ferry_testguest::workload::Workload;

use crate::child::{lines, FerryChild};
use crate::commands::migrate::ProgressView;
use crate::commands::run::{boot, watch_until, Ending, VmArgs};
use crate::migration::outgoing::migrate_vm;
use crate::report::print_migration_report;
use crate::size::show_size;
use crate::watch::GuestWatch;
use ferry_control::MigrateRequest;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Full verified sweeps of the working set before the migration.
    #[arg(long, default_value_t = 1)]
    pub sweeps: u64,
    /// The blackout to aim for.
    #[arg(long, default_value = "10ms", value_parser = crate::duration::parse_duration)]
    pub downtime: Duration,
    /// Echo the guest console.
    #[arg(long)]
    pub verbose: bool,
    /// Print the demo's whole report as one JSON document on stdout (the
    /// running commentary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The demo's whole report (`--json`).
#[derive(Debug, serde::Serialize)]
struct DemoReport {
    ok: bool,
    verdict: String,
    vcpus: u32,
    mem_bytes: u64,
    workload: String,
    source_ready_ms: Option<f64>,
    source_last_seq: Option<u64>,
    source_errors: u64,
    migration: Option<Box<ferry_migration::stats::MigrationReport>>,
    destination: Option<DestinationReport>,
}

#[derive(Debug, serde::Serialize)]
struct DestinationReport {
    first_seq: u64,
    first_stall_ms: f64,
    pages_verified: u64,
    sweeps_on_b: u64,
    errors: u64,
}

/// Commentary for people: stdout, or stderr when stdout carries JSON.
macro_rules! say {
    ($json:expr, $($arg:tt)*) => {
        if $json {
            eprintln!($($arg)*)
        } else {
            println!($($arg)*)
        }
    };
}

/// The demo's workload unless flags say otherwise: 256 MiB rewritten at 1 GiB/s.
pub fn default_workload() -> Workload {
    "dirty:256:1024".parse().expect("a valid built-in workload")
}

/// Host B: a `ferry receive` child and its console lines.
struct HostB {
    child: FerryChild,
    console: mpsc::Receiver<String>,
}

impl HostB {
    fn start(prealloc: bool, mem: u64) -> anyhow::Result<(Self, String)> {
        let mut args: Vec<String> = [
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "120s",
            "--insecure-plaintext",
        ]
        .map(String::from)
        .to_vec();
        args.extend(["--mem".into(), format!("{}M", mem >> 20)]);
        if prealloc {
            args.push("--prealloc".into());
        }
        let mut child = FerryChild::spawn("host B (ferry receive)", &args)?;
        let console = lines(child.take_stdout());
        let addr = child.listening_addr(Duration::from_secs(60))?;
        Ok((Self { child, console }, addr))
    }
}

pub fn demo(mut args: DemoArgs) -> anyhow::Result<bool> {
    args.vm
        .workload
        .get_or_insert_with(|| ferry_testguest::net::GuestWorkload {
            workload: default_workload(),
            net: None,
        });
    args.vm.vcpus.get_or_insert(2);
    let start = Instant::now();
    let (mut host_b, addr) = HostB::start(args.vm.prealloc, args.vm.mem)?;
    say!(
        args.json,
        "Host A: booting a {} vCPU VM with {} of memory, workload {} ...",
        args.vm.vcpus(),
        show_size(args.vm.mem),
        args.vm.workload()
    );
    say!(args.json, "Host B: `ferry receive` listening on {addr}");
    let mut doc = DemoReport {
        ok: false,
        verdict: String::new(),
        vcpus: args.vm.vcpus(),
        mem_bytes: args.vm.mem,
        workload: args.vm.workload().to_string(),
        source_ready_ms: None,
        source_last_seq: None,
        source_errors: 0,
        migration: None,
        destination: None,
    };
    let (mut vm, events) = boot(&args.vm)?;
    let mut watch = GuestWatch::new(start);
    let want = args.sweeps;
    let ending = watch_until(
        &mut vm,
        &events,
        None,
        &mut watch,
        Some(start + Duration::from_secs(60)),
        !args.verbose,
        |w| w.ready_ms.is_some() && w.sweeps >= want,
    );
    doc.source_ready_ms = watch.ready_ms;
    doc.source_errors = watch.errors;
    if ending != Ending::Predicate || !watch.memory_ok() {
        let why = format!(
            "Demo FAILED before the migration: ended by {ending:?}, {} errors",
            watch.errors
        );
        return finish(doc, false, why, args.json);
    }
    for event in events.try_iter() {
        watch.observe(&event);
    }
    say!(
        args.json,
        "Host A: guest READY after {:.0} ms, {} full sweep(s) verified; last heartbeat seq {}",
        watch.ready_ms.unwrap_or_default(),
        watch.sweeps,
        watch.last_seq.unwrap_or_default()
    );
    say!(
        args.json,
        "Live-migrating A -> B (downtime target {:?}) ...",
        args.downtime
    );
    let request = MigrateRequest {
        to: addr.clone(),
        downtime_ms: args.downtime.as_secs_f64() * 1e3,
        max_downtime_ms: None,
        cpu_share: None,
        bandwidth: None,
        auto_converge: true,
        mode: ferry_migration::mode::Mode::Precopy,
        allow_postcopy: false,
        recovery_ms: None,
        streams: None,
        priority: Default::default(),
        transport: Some(ferry_control::TransportRequest::InsecurePlaintext),
    };
    let mut view = ProgressView::new();
    let result = migrate_vm(&mut vm, &request, &mut |p| view.show(p));
    view.finish();
    // Heartbeats the source printed up to the pause.
    for event in events.try_iter() {
        watch.observe(&event);
    }
    let report = match result {
        Ok(r) => r,
        Err(failure) => {
            let why = format!(
                "Demo FAILED: the migration failed: {}; the VM {} on host A",
                failure.reason(),
                if failure.vm_running {
                    "still runs"
                } else {
                    "is paused"
                }
            );
            doc.migration = Some(failure.report);
            return finish(doc, false, why, args.json);
        }
    };
    {
        // Host A frees the guest's memory on cores host B's vCPUs leave.
        let _quiet = ferry_migration::thread_priority::Background::start();
        drop(vm);
    }
    if !args.json {
        print_migration_report(&report);
    }
    let last_src_seq = watch.last_seq.unwrap_or_default();
    doc.source_last_seq = watch.last_seq;
    doc.source_errors = watch.errors;
    doc.migration = Some(Box::new(report));
    let verdict = watch_destination(&mut host_b, last_src_seq, args.verbose);
    say!(args.json, "");
    say!(
        args.json,
        "  host A's last heartbeat     seq {last_src_seq} ({} verification errors on A)",
        watch.errors
    );
    match verdict {
        Ok(v) => {
            say!(
                args.json,
                "  host B's first heartbeat    seq {} (stall the guest measured: {:.2} ms)",
                v.first.seq,
                v.first.stall_us as f64 / 1e3
            );
            say!(args.json,
                "  on host B                   {} pages verified, {} full sweep(s) entirely on B, {} errors",
                v.last.ver - v.first.ver,
                v.sweeps_on_b,
                v.last.err
            );
            doc.destination = Some(DestinationReport {
                first_seq: v.first.seq,
                first_stall_ms: v.first.stall_us as f64 / 1e3,
                pages_verified: v.last.ver - v.first.ver,
                sweeps_on_b: v.sweeps_on_b,
                errors: v.last.err,
            });
            let ok = format!(
                "Demo OK: the VM moved from A to B while running; the guest continued at seq {} and verified its whole working set on B with 0 errors.",
                v.first.seq
            );
            finish(doc, true, ok, args.json)
        }
        Err(why) => finish(
            doc,
            false,
            format!("Demo FAILED on host B: {why}"),
            args.json,
        ),
    }
}

/// Says the verdict, and with `--json` prints the whole report.
fn finish(mut doc: DemoReport, ok: bool, verdict: String, json: bool) -> anyhow::Result<bool> {
    say!(json, "{verdict}");
    doc.ok = ok;
    doc.verdict = verdict;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(ok)
}

struct DestinationVerdict {
    first: Heartbeat,
    last: Heartbeat,
    sweeps_on_b: u64,
}

/// Reads host B's console until a full sweep ran entirely there.
fn watch_destination(
    host: &mut HostB,
    last_src_seq: u64,
    verbose: bool,
) -> Result<DestinationVerdict, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first: Option<Heartbeat> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = host.console.recv_timeout(left).map_err(|_| {
            let status = host.child.status_so_far();
            format!(
                "no full sweep verified on B within 20 s; B said: {}",
                status.join(" | ")
            )
        })?;
        if verbose {
            println!("B: {line}");
        }
        match parse_line(&line) {
            Line::PageError(e) => {
                return Err(format!("the guest found a bad page at {:#x}", e.addr))
            }
            Line::Heartbeat(hb) => {
                if hb.err > 0 {
                    return Err(format!("{} pages failed verification", hb.err));
                }
                let first = first.get_or_insert_with(|| hb.clone());
                if first.seq != last_src_seq + 1 {
                    return Err(format!(
                        "B's heartbeats start at seq {} after A's {last_src_seq}",
                        first.seq
                    ));
                }
                // +2: the sweep under way at the switchover ends on B, the
                // next one runs on B from its first page to its last.
                if hb.sweeps >= first.sweeps + 2 {
                    return Ok(DestinationVerdict {
                        sweeps_on_b: hb.sweeps - first.sweeps - 1,
                        first: first.clone(),
                        last: hb,
                    });
                }
            }
            _ => {}
        }
    }
}
