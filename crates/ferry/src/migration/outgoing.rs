//! The source side, inside the process that owns the VM: connect to the
//! destination and let the engine move the VM.

use std::net::ToSocketAddrs;
use std::time::Duration;

use ferry_migration::policy::PolicyConfig;
use ferry_migration::postcopy::source::Unfinished;
use ferry_migration::precopy::{migrate, resume_postcopy, Failure, MigrateError, MigrateOptions};
use ferry_migration::stats::{MigrationReport, Progress};
use ferry_vmm::Vm;

use super::priority::{CpuPriority, Yielding};
use super::source::VmSource;
use ferry_control::{MigrateRequest, TransportRequest};
use ferry_migration::transport::{DialError, Dialer, Link, SessionToken};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most streams `--streams auto` opens: past four, loopback and 25 GbE
/// links gain little and the destination needs as many cores.
const AUTO_STREAMS_MAX: u16 = 4;

/// One page-data stream per core the VM's vCPUs leave free: a stream needs
/// a core to copy with, and one that has to take it from a vCPU stalls the
/// guest for a scheduler slice at a time.
fn auto_streams(vcpus: u32) -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    cores
        .saturating_sub(vcpus)
        .clamp(1, u32::from(AUTO_STREAMS_MAX)) as u16
}

/// The share of the CPU a migration gets when the vCPUs would leave it
/// none: the guest yields half of every brake period (2.5 ms of 5 ms).
/// Measured on a 2-core host with 2 vCPUs rewriting 256 MiB at 1 GiB/s:
/// at 25% the first pass crawled at about 120 MiB/s, at 50% it ran at
/// 330-440 MiB/s and the whole migration took under a second.
const AUTO_CPU_SHARE: u32 = 50;

/// `--cpu-share auto`: a floor only where the migration would otherwise
/// wait for cores that the vCPUs never leave (its threads yield to them).
fn auto_cpu_share(vcpus: u32, priority: CpuPriority) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if priority == CpuPriority::Guest && vcpus >= cores {
        AUTO_CPU_SHARE
    } else {
        0
    }
}

/// Migrates `vm` as `request` says. On success the VM is stopped here (it
/// runs on the destination); on failure it runs here unless the commit
/// was sent and never acknowledged.
pub fn migrate_vm(
    vm: &mut Vm,
    request: &MigrateRequest,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    migrate_vm_cancellable(vm, request, None, progress)
}

/// Like [`migrate_vm`]; a cancel accepted by `cancel` ends the migration
/// before its blackout with the VM running here.
pub fn migrate_vm_cancellable(
    vm: &mut Vm,
    request: &MigrateRequest,
    cancel: Option<std::sync::Arc<ferry_migration::cancel::CancelState>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    migrate_vm_controlled(vm, request, cancel, None, progress)
}

/// Like [`migrate_vm_cancellable`]; `tuning` retunes the migration while
/// it runs (a new bandwidth cap, downtime target, or post-copy).
pub fn migrate_vm_controlled(
    vm: &mut Vm,
    request: &MigrateRequest,
    cancel: Option<std::sync::Arc<ferry_migration::cancel::CancelState>>,
    tuning: Option<std::sync::Arc<ferry_migration::tuning::Tuning>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    let options = MigrateOptions {
        cancel,
        tuning,
        mode: request.mode,
        policy: PolicyConfig {
            downtime_target: Duration::from_secs_f64(request.downtime_ms / 1e3),
            auto_converge: request.auto_converge,
            allow_postcopy: request.allow_postcopy,
            max_downtime: request
                .max_downtime_ms
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            ..Default::default()
        },
        bandwidth: request.bandwidth,
        ..Default::default()
    };
    let options = MigrateOptions {
        link_recovery: request
            .recovery_ms
            .map_or(options.link_recovery, Duration::from_millis),
        streams: request
            .streams
            .unwrap_or_else(|| auto_streams(vm.machine().vcpus)),
        cpu_share: request
            .cpu_share
            .unwrap_or_else(|| auto_cpu_share(vm.machine().vcpus, request.priority)),
        ..options
    };
    let refused = |error| Failure {
        error,
        vm_running: true,
        resume: None,
        report: Box::new(MigrationReport {
            mode: request.mode.name().into(),
            outcome: "aborted: VM running on the source".into(),
            destination: request.to.clone(),
            ..Default::default()
        }),
    };
    let mut source = if request.copy_storage {
        if let Some(why) = copy_storage_conflict(request) {
            return Err(refused(MigrateError::NotPossible(why)));
        }
        VmSource::copying_disk(vm).map_err(|why| refused(MigrateError::NotPossible(why)))?
    } else {
        VmSource::new(vm)
    };
    let stream = connect(request).map_err(refused)?;
    let yielding = match request.priority {
        CpuPriority::Migration => None,
        // The brake gives the migration its share: it runs in the cores
        // the parked vCPUs leave, and never makes a released vCPU wait.
        CpuPriority::Guest if options.cpu_share > 0 => Some(Yielding::start_idle()),
        CpuPriority::Guest => Some(Yielding::start()),
    };
    let mut result = migrate(&mut source, stream, &request.to, &options, progress);
    let disk_copy = source.disk_copy_report();
    match &mut result {
        Ok(report) => report.disk_copy = disk_copy,
        Err(failure) => failure.report.disk_copy = disk_copy,
    }
    drop(yielding);
    if result.is_ok() {
        let _quiet = ferry_migration::thread_priority::Background::start();
        vm.stop();
    }
    result
}

/// Why `request` cannot copy the VM's disk, if it cannot: every mode that
/// may run the VM on the destination before its last blocks are there.
fn copy_storage_conflict(request: &MigrateRequest) -> Option<String> {
    use ferry_migration::mode::Mode;
    match request.mode {
        Mode::Postcopy | Mode::Hybrid => Some(format!(
            "--copy-storage moves the disk by pre-copy only, and --mode {} may run the VM on the destination while blocks of its disk are still here; use --mode precopy or auto",
            request.mode.name()
        )),
        Mode::Auto if request.allow_postcopy => Some(
            "--copy-storage moves the disk by pre-copy only: drop --allow-postcopy".into(),
        ),
        _ => None,
    }
}

/// Tries again a post-copy that gave up (see `Failure::resume`); on
/// success the VM is stopped here, as after any completed migration.
pub fn resume_vm(
    vm: &mut Vm,
    unfinished: Box<Unfinished>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    // The engine serves the pages at normal priority: the guest waits on
    // them wherever `--priority` pointed the live rounds.
    let result = resume_postcopy(unfinished, progress);
    if result.is_ok() {
        let _quiet = ferry_migration::thread_priority::Background::start();
        vm.stop();
    }
    result
}

/// How `request` asks for its connections to be secured: TLS with an
/// identity and the destination's host name, or plaintext asked for by
/// name; nothing else.
fn dialer(request: &MigrateRequest) -> Result<Dialer, MigrateError> {
    let dialer = secured_dialer(request)?;
    match &request.token_file {
        Some(file) => {
            let token = SessionToken::read_file(file)
                .map_err(|e| MigrateError::Transport(format!("--token-file: {e}")))?;
            Ok(dialer.with_token(token))
        }
        None => Ok(dialer),
    }
}

fn secured_dialer(request: &MigrateRequest) -> Result<Dialer, MigrateError> {
    match &request.transport {
        Some(TransportRequest::Tls { dir, peer_name }) => Dialer::tls_from_dir(dir, peer_name)
            .map_err(|e| MigrateError::Transport(format!("--tls {}: {e}", dir.display()))),
        Some(TransportRequest::InsecurePlaintext) => Ok(Dialer::plaintext()),
        None => Err(MigrateError::Transport(
            "no transport chosen: give --tls DIR --peer-name HOST, or --insecure-plaintext (on both sides) to send the VM's memory in the clear".into(),
        )),
    }
}

fn connect(request: &MigrateRequest) -> Result<Link, MigrateError> {
    let dialer = dialer(request)?;
    let to = request.to.as_str();
    let failed = |source| MigrateError::Connect {
        addr: to.into(),
        source,
    };
    let addrs: Vec<_> = to.to_socket_addrs().map_err(failed)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match dialer.dial(addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(DialError::Handshake(e)) => {
                return Err(MigrateError::Transport(e.to_string()));
            }
            Err(e) => last = e.into(),
        }
    }
    Err(failed(last))
}
