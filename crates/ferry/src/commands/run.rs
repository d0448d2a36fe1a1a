//! `ferry run`: boots a VM with the test guest, streams its console, and
//! ends with a verdict on the guest's own memory checks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_migration::postcopy::source::Unfinished;
use ferry_migration::precopy::Failure;
use ferry_testguest::console::Line;
use ferry_testguest::net::GuestWorkload;
use ferry_testguest::workload::Workload;
use ferry_vmm::{GuestImage, Vm, VmConfig, VmEvent};

use crate::api::{ApiServer, Pending};
use crate::disk_flag::DiskFlag;
use crate::net_flag::NetFlag;
use crate::size::{parse_size, show_size};
use crate::watch::{GuestWatch, Seen};
use ferry_control::{Request, Response};
use ferry_vmm::snapshot::take_snapshot;

#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Guest memory, with a unit: 512M, 1G, 4GiB.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs; each runs its own share of the workload [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=ferry_testguest::MAX_VCPUS as i64))]
    pub vcpus: Option<u32>,
    /// idle, or dirty:WS_MB:RATE[:FILL_MB] (RATE in MiB/s or `max`), with
    /// an optional +net:IP/PREFIX:PORT (the guest's TCP and UDP echoes on
    /// its card; needs --net) and an optional +disk:MB:RATE (the guest's
    /// disk workload, RATE in 4 KiB blocks/s or `max`; needs --disk)
    /// [default: idle].
    #[arg(long)]
    pub workload: Option<GuestWorkload>,
    /// A virtio-net card on an existing tap:
    /// tap=NAME[,netns=NS][,mac=AA:BB:CC:DD:EE:FF].
    #[arg(long, value_name = "tap=NAME[,netns=NS][,mac=MAC]")]
    pub net: Option<NetFlag>,
    /// A virtio-blk disk on a raw image file (opened with O_DIRECT and
    /// locked exclusively): path=IMG[,readonly]. It migrates on shared
    /// storage (the destination's `ferry receive --disk` opens the same
    /// image and takes its lock at the hand-over) and is snapshotted only
    /// with `--stop`.
    #[arg(long, value_name = "path=IMG[,readonly]")]
    pub disk: Option<DiskFlag>,
    /// Guest ELF to boot instead of the built-in test guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Fault in all guest memory before the guest starts.
    #[arg(long)]
    pub prealloc: bool,
}

impl VmArgs {
    pub fn vcpus(&self) -> u32 {
        self.vcpus.unwrap_or(1)
    }

    pub fn workload(&self) -> Workload {
        self.guest_workload().workload
    }

    /// The workload with its network term, if any.
    pub fn guest_workload(&self) -> GuestWorkload {
        self.workload.unwrap_or(GuestWorkload {
            workload: Workload::Idle,
            net: None,
            disk: None,
        })
    }

    /// For the commands that take these flags but cannot give the VM a
    /// disk (the demo, which makes its own): a clear error instead of a disk
    /// silently dropped.
    pub fn refuse_disk(&self, command: &str) -> anyhow::Result<()> {
        if self.disk.is_some() || self.guest_workload().disk.is_some() {
            bail!("{command} cannot take --disk or a +disk: term (ferry run and ferry vm create do; ferry demo storage makes its own disk)");
        }
        Ok(())
    }

    /// Checks what can be checked before touching KVM, then builds the config.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        ferry_vmm::memory::check_size(self.mem, ferry_vmm::memory::host_available_bytes()?)
            .context("--mem")?;
        let guest_workload = self.guest_workload();
        if guest_workload.net.is_some() && self.net.is_none() {
            bail!(
                "--workload {guest_workload} serves the network, but the VM has no card: give --net tap=NAME"
            );
        }
        if let Some(load) = guest_workload.disk {
            let Some(disk) = &self.disk else {
                bail!("--workload {guest_workload} writes a disk, but the VM has none: give --disk path=IMG");
            };
            let size = std::fs::metadata(&disk.0.path)
                .with_context(|| format!("--disk: disk image {}", disk.0.path.display()))?
                .len();
            if size < load.bytes() {
                bail!(
                    "--workload disk:{load} needs {} of disk but {} holds {}",
                    show_size(load.bytes()),
                    disk.0.path.display(),
                    show_size(size)
                );
            }
            if disk.0.readonly {
                bail!("--workload disk:{load} writes the disk, but --disk says readonly");
            }
        }
        let workload = guest_workload.workload;
        let needed = ferry_testguest::guest_mem_needed(&workload);
        if needed >= self.mem {
            bail!(
                "workload {} does not fit: it needs {} but the guest has only {} of memory (--mem)",
                workload,
                show_size(needed),
                show_size(self.mem)
            );
        }
        let image = match &self.guest {
            Some(path) => GuestImage::File(path.clone()),
            None => GuestImage::Bytes(ferry_testguest::GUEST_ELF.into()),
        };
        Ok(VmConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus(),
            image,
            cmdline: ferry_testguest::guest_cmdline_with_net(&guest_workload, self.vcpus(), None),
            prealloc: self.prealloc,
            net: self.net.clone().map(|n| n.0),
            block: self.disk.clone().map(|d| d.0),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub supervise: SuperviseArgs,
}

/// How a VM is watched once it runs: shared by `run` and `restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    /// Serve the VM's API (snapshot, status) on this Unix socket.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Stop the VM after this long (e.g. 5s, 500ms); default: until Ctrl-C.
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub duration: Option<Duration>,
    /// Do not echo the guest console.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the final report as one JSON document.
    #[arg(long)]
    pub json: bool,
}

impl SuperviseArgs {
    /// Starts serving `--api`, if asked, before the VM exists: a socket
    /// that cannot be bound must fail the command before anything runs.
    pub fn bind_api(&self) -> anyhow::Result<Option<ApiServer>> {
        self.api.as_deref().map(ApiServer::bind).transpose()
    }
}

/// Why the watch loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    DurationReached,
    Signal,
    GuestStopped,
    Predicate,
    /// A snapshot with `stop` was taken: the VM lives on in the file.
    SnapshotStopped,
    /// The VM was live-migrated away and runs on the destination.
    Migrated,
    /// The commit was sent but never acknowledged: the VM is paused here
    /// and must not run until an operator knows where it lives.
    MigrationInDoubt,
    /// Post-copy lost its source: pages the VM needs are gone, so it was
    /// stopped here rather than run on partial memory.
    MemoryLost,
}

/// Boots a VM, returning it and the instant the command started.
pub fn boot(args: &VmArgs) -> anyhow::Result<(Vm, std::sync::mpsc::Receiver<VmEvent>)> {
    let config = args.to_config()?;
    let mut vm = Vm::start(config).context("cannot start the VM")?;
    let events = vm.take_events().expect("events are taken once, here");
    Ok((vm, events))
}

/// Feeds events into `watch` until the duration passes, a signal arrives,
/// the guest stops by itself, or `done` says so; echoes the console unless
/// `quiet`.
#[allow(clippy::too_many_arguments)]
pub fn watch_until(
    vm: &mut Vm,
    events: &std::sync::mpsc::Receiver<VmEvent>,
    api: Option<&ApiServer>,
    watch: &mut GuestWatch,
    deadline: Option<Instant>,
    quiet: bool,
    mut done: impl FnMut(&GuestWatch) -> bool,
) -> Ending {
    let interrupted = interrupt_flag();
    // A post-copy that gave up on its link, kept for a ResumeMigration.
    let mut unfinished = None;
    // True while a Pause request holds the vCPUs.
    let mut paused = false;
    loop {
        while let Some(pending) = api.and_then(ApiServer::try_next) {
            if let Some(ending) = serve_request(vm, pending, &mut unfinished, &mut paused, watch) {
                return ending;
            }
        }
        if interrupted.load(Ordering::Relaxed) {
            return Ending::Signal;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ending::DurationReached;
        }
        let Ok(event) = events.recv_timeout(Duration::from_millis(20)) else {
            // A guest may be silent (waiting on memory, say): the caller
            // still gets to look.
            if done(watch) {
                return Ending::Predicate;
            }
            continue;
        };
        let had_heartbeat = watch.first_heartbeat_ms.is_some();
        let had_ready = watch.ready_ms.is_some();
        match watch.observe(&event) {
            Seen::Console(text, parsed) => {
                if !quiet {
                    println!("{text}");
                }
                if !had_heartbeat && matches!(parsed, Line::Heartbeat(_)) {
                    eprintln!(
                        "ferry: first heartbeat {:.1} ms after start",
                        watch.first_heartbeat_ms.unwrap_or_default()
                    );
                }
                if !had_ready && matches!(parsed, Line::Ready(_)) {
                    eprintln!(
                        "ferry: READY {:.1} ms after start",
                        watch.ready_ms.unwrap_or_default()
                    );
                }
            }
            Seen::Stopped(reason) => {
                eprintln!("ferry: {reason}");
                return Ending::GuestStopped;
            }
        }
        if done(watch) {
            return Ending::Predicate;
        }
    }
}

/// Carries out one API request on the VM this thread owns.
fn serve_request(
    vm: &mut Vm,
    pending: Pending,
    unfinished: &mut Option<Box<Unfinished>>,
    paused: &mut bool,
    watch: &GuestWatch,
) -> Option<Ending> {
    let refuse_paused = |pending: Pending, what: &str| {
        pending.answer(Response::Error {
            message: format!("the VM is paused: resume it before {what}"),
        });
        None
    };
    match pending.request.clone() {
        Request::Status => {
            pending.answer(Response::Status {
                vcpus: vm.machine().vcpus,
                mem_bytes: vm.machine().mem_bytes,
                uptime_ms: vm.started_at().elapsed().as_secs_f64() * 1e3,
                paused: *paused,
                guest: watch.guest_facts(),
            });
            None
        }
        Request::Pause if *paused => {
            pending.answer(Response::Error {
                message: "the VM is already paused".into(),
            });
            None
        }
        Request::Pause => {
            match vm.pause() {
                Ok(paused_at) => {
                    let took = paused_at.requested.elapsed();
                    *paused = true;
                    eprintln!("ferry: VM paused ({:.2} ms)", took.as_secs_f64() * 1e3);
                    pending.answer(Response::Paused {
                        pause_ms: took.as_secs_f64() * 1e3,
                    });
                }
                Err(e) => {
                    // Whatever stopped, run it again: a VM is paused fully
                    // or not at all.
                    vm.resume();
                    pending.answer(Response::Error {
                        message: format!("cannot pause the VM (it runs on): {e}"),
                    });
                }
            }
            None
        }
        // Answered by the API thread itself; never reaches here.
        Request::CancelMigration => {
            pending.answer(Response::CancelRequested { migrating: false });
            None
        }
        Request::TuneMigration(_) => {
            pending.answer(Response::TuneRequested { migrating: false });
            None
        }
        Request::Resume if !*paused => {
            pending.answer(Response::Error {
                message: "the VM is not paused".into(),
            });
            None
        }
        Request::Resume => {
            vm.resume();
            *paused = false;
            eprintln!("ferry: VM resumed");
            pending.answer(Response::Resumed);
            None
        }
        Request::Migrate(_) | Request::ResumeMigration if *paused => {
            refuse_paused(pending, "migrating it")
        }
        Request::Snapshot { .. } if *paused => refuse_paused(pending, "a snapshot"),
        Request::Migrate(request) => {
            let tuning = pending.cancel().begin_tuning(request.bandwidth);
            let cancel = pending.cancel().begin();
            let result = crate::migration::outgoing::migrate_vm_controlled(
                vm,
                &request,
                Some(cancel),
                Some(tuning),
                &mut |p| pending.progress(Response::Progress(p.clone())),
            );
            pending.cancel().end();
            match result {
                Ok(report) => {
                    eprintln!(
                        "ferry: VM migrated to {} in {:.1} ms (host downtime {:.2} ms); stopped here",
                        request.to, report.total_ms, report.blackout.host_downtime_ms
                    );
                    pending.answer(Response::Migrated(Box::new(report)));
                    // What is left, freeing the guest's memory on the way
                    // out, waits for cores nothing else wants.
                    std::mem::forget(ferry_migration::thread_priority::Background::start());
                    Some(Ending::Migrated)
                }
                Err(failure) => migration_failed(&request.to, failure, pending, unfinished),
            }
        }
        Request::ResumeMigration => {
            let Some(u) = unfinished.take() else {
                pending.answer(Response::Error {
                    message: "no interrupted post-copy to resume here".into(),
                });
                return None;
            };
            let to = u.destination().to_string();
            let result = crate::migration::outgoing::resume_vm(vm, u, &mut |p| {
                pending.progress(Response::Progress(p.clone()))
            });
            match result {
                Ok(report) => {
                    eprintln!(
                        "ferry: post-copy to {to} resumed and completed in {:.1} ms; stopped here",
                        report.total_ms
                    );
                    pending.answer(Response::Migrated(Box::new(report)));
                    // What is left, freeing the guest's memory on the way
                    // out, waits for cores nothing else wants.
                    std::mem::forget(ferry_migration::thread_priority::Background::start());
                    Some(Ending::Migrated)
                }
                Err(failure) => migration_failed(&to, failure, pending, unfinished),
            }
        }
        Request::Snapshot { path, stop } => match take_snapshot(vm, &path, stop) {
            Ok(report) => {
                eprintln!(
                    "ferry: snapshot written to {} ({} bytes, paused {:.1} ms{})",
                    path.display(),
                    report.stats.file_bytes,
                    report.pause_ms,
                    if report.stopped { ", VM stopped" } else { "" }
                );
                let stopped = report.stopped;
                pending.answer(Response::Snapshot(report));
                stopped.then_some(Ending::SnapshotStopped)
            }
            Err(e) => {
                eprintln!(
                    "ferry: snapshot to {} failed, VM resumed: {e}",
                    path.display()
                );
                pending.answer(Response::Error {
                    message: format!("snapshot failed (the VM was resumed): {e}"),
                });
                None
            }
        },
    }
}

/// Reports a failed migration. A post-copy that can be resumed keeps its
/// VM paused here (its pages are needed) and waits for ResumeMigration.
fn migration_failed(
    to: &str,
    mut failure: Failure,
    pending: Pending,
    unfinished: &mut Option<Box<Unfinished>>,
) -> Option<Ending> {
    let reason = failure.reason();
    let resumable = failure.resume.take();
    eprintln!(
        "ferry: migration to {to} failed: {reason}; {}",
        if failure.vm_running {
            "the VM runs here"
        } else if resumable.is_some() {
            "the VM is PAUSED here and its pages stay here: `ferry migrate SOCKET --resume` tries again"
        } else {
            "the VM is PAUSED here"
        }
    );
    let vm_running = failure.vm_running;
    let keep = resumable.is_some();
    *unfinished = resumable;
    pending.answer(Response::MigrationFailed {
        reason,
        vm_running,
        resumable: keep,
        report: failure.report,
    });
    (!vm_running && !keep).then_some(Ending::MigrationInDoubt)
}

/// SIGINT/SIGTERM set this flag instead of killing us, so the VM is
/// stopped cleanly and the report still printed.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
                eprintln!("ferry: cannot handle signal {sig}: {e}");
            }
        }
        flag
    })
    .clone()
}

pub fn run(args: RunArgs) -> anyhow::Result<bool> {
    let start = Instant::now();
    let api = args.supervise.bind_api()?;
    let (vm, events) = boot(&args.vm)?;
    if let Some(net) = vm.net() {
        eprintln!(
            "ferry: virtio-net card {} on tap {} (virtio-mmio slot 0)",
            net.mac(),
            net.tap_name()
        );
    }
    eprintln!(
        "ferry: VM started: {} vCPU(s), {} memory{}, workload {}, TSC {} kHz ({:.1} ms to create)",
        args.vm.vcpus(),
        show_size(args.vm.mem),
        vm.ram().prealloc_note(),
        args.vm.guest_workload(),
        vm.tsc_khz(),
        start.elapsed().as_secs_f64() * 1e3
    );
    supervise(
        vm,
        events,
        api,
        start,
        &args.supervise,
        Extra::Booted,
        &mut |_| None,
    )
}

/// How the supervised VM came to run here, for the report.
pub enum Extra {
    Booted,
    Restored(RestoreFigures),
    Received(ferry_migration::precopy::ReceiveReport),
}

/// Watches a running VM until it should end, stops it and prints the
/// report; true when the guest's checks passed.
pub fn supervise(
    mut vm: Vm,
    events: std::sync::mpsc::Receiver<VmEvent>,
    api: Option<ApiServer>,
    start: Instant,
    args: &SuperviseArgs,
    extra: Extra,
    on_watch: &mut dyn FnMut(&GuestWatch) -> Option<Ending>,
) -> anyhow::Result<bool> {
    let mut watch = GuestWatch::new(start);
    let deadline = args.duration.map(|d| start + d);
    let mut asked = None;
    let ending = watch_until(
        &mut vm,
        &events,
        api.as_ref(),
        &mut watch,
        deadline,
        args.quiet,
        |w| {
            asked = on_watch(w);
            asked.is_some()
        },
    );
    let ending = asked.unwrap_or(ending);
    vm.stop();
    for event in events.try_iter() {
        if let Seen::Console(text, _) = watch.observe(&event) {
            if !args.quiet {
                println!("{text}");
            }
        }
    }
    let ok = watch.memory_ok()
        && watch.stopped.is_none()
        && watch.sequence_breaks == 0
        && ending != Ending::MigrationInDoubt
        && ending != Ending::MemoryLost;
    let (restored, received) = match extra {
        Extra::Booted => (None, None),
        Extra::Restored(r) => (Some(r), None),
        Extra::Received(r) => (None, Some(r)),
    };
    let machine = vm.machine();
    let report = RunReport {
        mem_bytes: machine.mem_bytes,
        vcpus: machine.vcpus,
        cmdline: machine.cmdline.clone(),
        ended_by: format!("{ending:?}"),
        wall_ms: watch.elapsed().as_secs_f64() * 1e3,
        verdict: if ok { "ok" } else { "FAILED" },
        restored,
        received,
        guest: &watch,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_table();
    }
    Ok(ok)
}

/// What a restore measured, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreFigures {
    pub file: PathBuf,
    pub restore_ms: f64,
    pub memory_bytes: u64,
    pub read_mib_per_s: f64,
}

#[derive(serde::Serialize)]
struct RunReport<'a> {
    mem_bytes: u64,
    vcpus: u32,
    cmdline: String,
    ended_by: String,
    wall_ms: f64,
    verdict: &'static str,
    restored: Option<RestoreFigures>,
    received: Option<ferry_migration::precopy::ReceiveReport>,
    guest: &'a GuestWatch,
}

impl RunReport<'_> {
    fn print_table(&self) {
        let g = self.guest;
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        let mut rows = vec![
            (
                "VM",
                format!(
                    "{} vCPU, {}, {}",
                    self.vcpus,
                    show_size(self.mem_bytes),
                    self.cmdline
                ),
            ),
            (
                "ran for",
                format!("{:.1} s ({})", self.wall_ms / 1e3, self.ended_by),
            ),
            ("start to first heartbeat", ms(g.first_heartbeat_ms)),
        ];
        if let Some(r) = &self.restored {
            rows.push(("restored from", r.file.display().to_string()));
            rows.push((
                "restore time",
                format!(
                    "{:.1} ms ({} read at {:.0} MiB/s)",
                    r.restore_ms,
                    show_size(r.memory_bytes),
                    r.read_mib_per_s
                ),
            ));
            rows.push((
                "first heartbeat after restore",
                g.first_seq.map_or("-".into(), |s| format!("seq {s}")),
            ));
            rows.push((
                "stall the guest saw",
                format!("{:.1} ms", g.first_stall_us as f64 / 1e3),
            ));
        } else if let Some(r) = &self.received {
            rows.push((
                "received by live migration",
                format!(
                    "{} rounds, {} pages ({} zero), state {} B loaded in {:.2} ms",
                    r.rounds, r.pages, r.zero_pages, r.state_bytes, r.load_ms
                ),
            ));
            rows.push((
                "first heartbeat here",
                g.first_seq.map_or("-".into(), |s| format!("seq {s}")),
            ));
            rows.push((
                "stall the guest saw",
                format!("{:.2} ms", g.first_stall_us as f64 / 1e3),
            ));
        } else {
            rows.push(("start to READY", ms(g.ready_ms)));
        }
        rows.extend([
            (
                "heartbeats",
                format!("{} (sequence breaks: {})", g.heartbeats, g.sequence_breaks),
            ),
            (
                "pages written / verified",
                format!("{} / {}", g.pages_written, g.pages_verified),
            ),
            ("full sweeps verified", g.sweeps.to_string()),
            (
                "longest stall seen by guest",
                format!("{:.3} ms", g.max_stall_us as f64 / 1e3),
            ),
            ("verification errors", g.errors.to_string()),
            (
                "stopped by guest",
                g.stopped.clone().unwrap_or_else(|| "-".into()),
            ),
            ("verdict", self.verdict.to_string()),
        ]);
        println!();
        for (k, v) in rows {
            println!("  {k:<30} {v}");
        }
    }
}
