//! `ferry demo --direct`: "host A" is this process, "host B" a `ferry
//! receive` child; the running VM moves from A to B over TCP, engine to
//! engine, without agents. `ferry demo network` runs the same with the
//! VM's network card on the test topology and a client probing it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::child::{lines, FerryChild};
use crate::commands::migrate::ProgressView;
use crate::commands::run::{boot, watch_until, Ending};
use crate::migration::outgoing::migrate_vm;
use crate::report::print_migration_report;
use crate::size::show_size;
use crate::watch::GuestWatch;
use ferry_control::MigrateRequest;

use super::network::NetworkScene;
use super::storage::StorageScene;
use super::{conclude, finish, say, verify_destination, DemoArgs, DemoReport};

/// Host B: a `ferry receive` child and its console lines.
struct HostB {
    child: FerryChild,
    console: mpsc::Receiver<String>,
}

impl HostB {
    fn start(prealloc: bool, mem: u64, extra: &[String]) -> anyhow::Result<(Self, String)> {
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
        args.extend_from_slice(extra);
        let mut child = FerryChild::spawn("host B (ferry receive)", &args)?;
        let console = lines(child.take_stdout());
        let addr = child.listening_addr(Duration::from_secs(60))?;
        Ok((Self { child, console }, addr))
    }
}

pub(super) fn demo(args: &DemoArgs) -> anyhow::Result<bool> {
    run(args, None, None)
}

/// The direct demo; with `net`, the VM serves TCP and UDP on its card and
/// the scene's client probes it from before the migration to after it;
/// with `disk`, the VM writes and checks a disk, shared or copied.
pub(super) fn run(
    args: &DemoArgs,
    mut net: Option<NetworkScene>,
    disk: Option<StorageScene>,
) -> anyhow::Result<bool> {
    let start = Instant::now();
    let vm_args = match (&net, &disk) {
        (Some(scene), _) => scene.vm_args(&args.vm)?,
        (None, Some(scene)) => scene.vm_args(&args.vm)?,
        (None, None) => args.vm.clone(),
    };
    let mut host_b_extra = net
        .as_ref()
        .map_or_else(Vec::new, NetworkScene::host_b_args);
    host_b_extra.extend(
        disk.as_ref()
            .map_or_else(Vec::new, StorageScene::host_b_args),
    );
    let (host_b, addr) = HostB::start(vm_args.prealloc, vm_args.mem, &host_b_extra)?;
    say!(
        args.json,
        "Host A: booting a {} vCPU VM with {} of memory, workload {} ...",
        vm_args.vcpus(),
        show_size(vm_args.mem),
        vm_args.guest_workload()
    );
    say!(args.json, "Host B: `ferry receive` listening on {addr}");
    let hosts = match (&net, &disk) {
        (Some(scene), _) => scene.describe(),
        (None, Some(scene)) => scene.describe(),
        (None, None) => {
            "direct: host A is this process, host B a `ferry receive` child, plaintext on loopback"
                .into()
        }
    };
    let mut doc = DemoReport::new(args, hosts);
    let (mut vm, events) = boot(&vm_args)?;
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
    if let Some(scene) = net.as_mut() {
        scene.start_probe(args.json)?;
    }
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
        token_file: None,
        copy_storage: disk.as_ref().is_some_and(StorageScene::copies),
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
    let verdict = verify_destination(
        |left| host_b.console.recv_timeout(left).ok(),
        || host_b.child.status_so_far().join(" | "),
        last_src_seq,
        disk.as_ref().map(StorageScene::round_blocks),
        args.verbose,
        args.json,
    );
    let mut scene_failure = match net {
        Some(scene) => {
            let stall_us = verdict.as_ref().map(|v| v.first.stall_us).ok();
            let (outcome, failure) = scene.finish(stall_us, args.json);
            doc.network = Some(outcome);
            failure
        }
        None => None,
    };
    if let Some(scene) = disk {
        let on_b = verdict.as_ref().ok().and_then(|v| v.disk);
        let (outcome, failure) = scene.finish(&report, on_b, args.json);
        doc.storage = Some(outcome);
        scene_failure = scene_failure.or(failure);
    }
    doc.migration = Some(Box::new(report));
    conclude(
        doc,
        verdict,
        last_src_seq,
        watch.errors,
        scene_failure,
        args.json,
    )
}
