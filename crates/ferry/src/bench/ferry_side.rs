//! One Ferry migration measured the way the QEMU side is: a `ferry run`
//! and a `ferry receive` as separate processes, the guest consoles read
//! off their stdout, the migration driven over the source's API socket.
//! On the network row each process runs in its host's namespace with its
//! card on that host's tap, and the migration goes between the hosts'
//! addresses, as QEMU's does on that row.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_migration::stats::MigrationReport;
use ferry_testguest::workload::Workload;
use serde::Serialize;

use super::console_watch::{disk_checked, disk_failures, dst_done, judge, Console, VERIFY_TIMEOUT};
use super::observer::{NoObserver, RunObserver};
use crate::api::call;
use crate::child::FerryChild;
use crate::migration::priority::CpuPriority;
use ferry_control::{MigrateRequest, Request, Response};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct FerryMigration {
    pub mem_bytes: u64,
    pub workload: Workload,
    pub prealloc: bool,
    pub downtime: Duration,
    pub bandwidth: Option<u64>,
    pub settle: Duration,
    pub mode: ferry_migration::mode::Mode,
    pub streams: Option<u16>,
    pub priority: CpuPriority,
    pub vcpus: u32,
    /// Mutual TLS 1.3 with identities made for the run, else plaintext.
    pub tls: bool,
    /// The network row's card, echo service and namespaces; None: no card,
    /// both processes in this one's namespace, migration over loopback.
    pub net: Option<FerryNet>,
    /// The storage rows' disk; None: no disk.
    pub disk: Option<BenchDisk>,
}

/// A disk the guest writes and checks (`+disk:MIB:max`) across the move.
#[derive(Debug, Clone)]
pub struct BenchDisk {
    /// The source's image (which must exist).
    pub image: PathBuf,
    /// The destination's own image, copied with `--copy-storage` (which
    /// must not exist); None: the same image, on storage both share.
    pub copy_to: Option<PathBuf>,
    /// MiB of blocks the guest writes and checks.
    pub mib: u64,
}

/// Where the network row puts a Ferry run.
#[derive(Debug, Clone)]
pub struct FerryNet {
    /// The guest's TCP and UDP echo (`+net:IP/PREFIX:PORT`).
    pub echo: ferry_testguest::net::NetEcho,
    /// The card's MAC (the same as QEMU's on that row).
    pub mac: ferry_netlab::MacAddr,
    /// Host A: `ferry run` runs in this namespace, its card on this tap.
    pub source_ns: String,
    pub source_tap: String,
    /// Host B: `ferry receive` runs in this namespace, its card on this
    /// tap, and listens on this address.
    pub destination_ns: String,
    pub destination_tap: String,
    pub destination_ip: std::net::Ipv4Addr,
}

/// Starts a `ferry` child in network namespace `ns`, or here for None (a
/// child is born in the namespace of the thread that starts it).
fn spawn_in(ns: Option<&str>, name: &'static str, args: &[String]) -> anyhow::Result<FerryChild> {
    match ns {
        None => FerryChild::spawn(name, args),
        Some(ns) => ferry_netlab::in_netns(ns, || FerryChild::spawn(name, args))?,
    }
}

/// Host names of the bench's TLS identities.
const TLS_SOURCE: &str = "bench-src";
const TLS_DESTINATION: &str = "bench-dst";

/// `ferry ca init DIR/tls-ca` and an identity for each side; returns the
/// CA directory.
fn bench_identities(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca = dir.join(format!("tls-ca-{}", std::process::id()));
    if ca.join(TLS_DESTINATION).join("cert.pem").exists() {
        return Ok(ca);
    }
    let exe = std::env::current_exe()?;
    let ca_s = ca.display().to_string();
    let mut steps = vec![vec!["ca", "init", ca_s.as_str()]];
    for host in [TLS_SOURCE, TLS_DESTINATION] {
        steps.push(vec![
            "ca",
            "issue",
            "--name",
            host,
            "--ip",
            "127.0.0.1",
            ca_s.as_str(),
        ]);
    }
    for args in steps {
        let out = std::process::Command::new(&exe).args(&args).output()?;
        if !out.status.success() {
            bail!(
                "ferry {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(ca)
}

/// QEMU's credentials for the TLS rows, from the same identities.
pub fn qemu_tls_for_run(dir: &Path) -> anyhow::Result<super::qemu_tls::QemuTls> {
    let ca = bench_identities(dir)?;
    super::qemu_tls::QemuTls::from_identities(&ca, TLS_SOURCE, TLS_DESTINATION)
}

#[derive(Debug, Clone, Serialize)]
pub struct FerryOutcome {
    pub total_ms: f64,
    pub setup_ms: f64,
    pub host_downtime_ms: f64,
    pub guest_stall_ms: f64,
    pub transferred_bytes: u64,
    pub rounds: usize,
    pub max_throttle_percent: u32,
    pub throughput_gbit: f64,
    pub last_src_seq: Option<u64>,
    pub first_dst_seq: Option<u64>,
    pub dst_sweeps_verified: u64,
    pub errors: u64,
    pub verified: bool,
    pub verify_failures: Vec<String>,
    /// With a disk: blocks the destination's guest read back and checked.
    pub disk_blocks_checked: Option<u64>,
    pub wall_ms: f64,
    /// CPU the source's migration threads used, ms (`bench::cpu`).
    pub src_cpu_ms: f64,
    /// CPU the destination process used during the migration, ms.
    pub dst_cpu_ms: Option<f64>,
    /// Ferry's own report (rounds, blackout parts), without its timeline.
    pub report: MigrationReport,
}

/// How long a source that handed its VM over may take to exit.
const SOURCE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run_ferry_migration(m: &FerryMigration, dir: &Path) -> anyhow::Result<FerryOutcome> {
    run_ferry_migration_observed(m, dir, &mut NoObserver)
}

/// [`run_ferry_migration`], telling `observer` when the guest is up on the
/// source and when it has been verified on the destination.
pub fn run_ferry_migration_observed(
    m: &FerryMigration,
    dir: &Path,
    observer: &mut dyn RunObserver,
) -> anyhow::Result<FerryOutcome> {
    let started = Instant::now();
    let socket: PathBuf = dir.join(format!("src-{}.sock", std::process::id()));
    let mem = format!("{}M", m.mem_bytes >> 20);
    let listen = match &m.net {
        Some(net) => format!("{}:0", net.destination_ip),
        None => "127.0.0.1:0".into(),
    };
    // The destination reserves its memory up front, as QEMU's does.
    let mut dst_args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        listen,
        "--mem".into(),
        mem.clone(),
    ];
    let transport = if m.tls {
        let ca = bench_identities(dir)?;
        dst_args.extend([
            "--tls".into(),
            ca.join(TLS_DESTINATION).display().to_string(),
            "--allow-source".into(),
            TLS_SOURCE.into(),
        ]);
        ferry_control::TransportRequest::Tls {
            dir: ca.join(TLS_SOURCE),
            peer_name: TLS_DESTINATION.into(),
        }
    } else {
        dst_args.push("--insecure-plaintext".into());
        ferry_control::TransportRequest::InsecurePlaintext
    };
    let mut workload = match &m.net {
        Some(net) => format!("{}+net:{}", m.workload, net.echo),
        None => m.workload.to_string(),
    };
    if let Some(disk) = &m.disk {
        workload = format!("{workload}+disk:{}:max", disk.mib);
    }
    let mut src_args: Vec<String> = vec![
        "run".into(),
        "--mem".into(),
        mem,
        "--workload".into(),
        workload,
        "--vcpus".into(),
        m.vcpus.to_string(),
        "--api".into(),
        socket.display().to_string(),
    ];
    if m.priority == CpuPriority::Migration {
        dst_args.extend(["--priority".into(), "migration".into()]);
    }
    if m.prealloc {
        dst_args.push("--prealloc".into());
        src_args.push("--prealloc".into());
    }
    if let Some(net) = &m.net {
        src_args.extend([
            "--net".into(),
            format!(
                "tap={},netns={},mac={}",
                net.source_tap, net.source_ns, net.mac
            ),
        ]);
        // The card keeps the MAC that comes with the VM's state.
        dst_args.extend([
            "--net".into(),
            format!("tap={},netns={}", net.destination_tap, net.destination_ns),
        ]);
    }
    if let Some(disk) = &m.disk {
        src_args.extend(["--disk".into(), format!("path={}", disk.image.display())]);
        let on_b = disk.copy_to.as_ref().unwrap_or(&disk.image);
        dst_args.extend(["--disk".into(), format!("path={}", on_b.display())]);
    }
    let (src_ns, dst_ns) = match &m.net {
        Some(net) => (
            Some(net.source_ns.as_str()),
            Some(net.destination_ns.as_str()),
        ),
        None => (None, None),
    };
    let mut dst = spawn_in(dst_ns, "ferry-dst", &dst_args)?;
    let dst_console = Console::spawn_reader("ferry-dst", dst.take_stdout());
    // Printed once the memory is reserved.
    let addr = dst.listening_addr(Duration::from_secs(60))?;
    let mut src = spawn_in(src_ns, "ferry-src", &src_args)?;
    let src_console = Console::spawn_reader("ferry-src", src.take_stdout());
    let ready = src_console
        .wait_until(Instant::now() + READY_TIMEOUT, |s| s.ready.is_some())
        .ready
        .clone();
    let Some((_, ready)) = ready else {
        bail!("the source guest printed no READY within {READY_TIMEOUT:?}");
    };
    observer.guest_ready().map_err(|e| anyhow!(e))?;
    std::thread::sleep(m.settle);
    let request = Request::Migrate(MigrateRequest {
        to: addr,
        downtime_ms: m.downtime.as_secs_f64() * 1e3,
        max_downtime_ms: None,
        cpu_share: None,
        bandwidth: m.bandwidth,
        auto_converge: true,
        mode: m.mode,
        // The capped rows compare post-copy engines: auto may choose it.
        allow_postcopy: true,
        recovery_ms: None,
        streams: m.streams,
        priority: m.priority,
        transport: Some(transport),
        token_file: None,
        copy_storage: m.disk.as_ref().is_some_and(|d| d.copy_to.is_some()),
    });
    let dst_cpu_before = super::cpu::process_cpu_ms(dst.pid());
    let answer = call(&socket, &request)?;
    let dst_cpu_ms = dst_cpu_before
        .zip(super::cpu::process_cpu_ms(dst.pid()))
        .map(|(before, after)| after - before);
    let mut report = match answer {
        Response::Migrated(r) => *r,
        Response::MigrationFailed { reason, .. } => {
            return Err(anyhow!("Ferry's migration failed: {reason}"))
        }
        other => bail!("unexpected answer: {other:?}"),
    };
    let ws_pages = ready.ws_mb * 256;
    let disk_round = m.disk.as_ref().map(|d| d.mib << 8);
    let dst_state = dst_console
        .wait_until(Instant::now() + VERIFY_TIMEOUT, |s| {
            dst_done(&s.heartbeats, ws_pages)
                && disk_round.is_none_or(|round| disk_checked(s) >= round)
        })
        .clone_for_verdict();
    observer.guest_moved();
    // The source prints what its guest said while the migration ran only
    // once the migration returns, then exits: read it to the end, or its
    // last heartbeats would look lost.
    let src_state = src_console
        .wait_until(Instant::now() + SOURCE_EXIT_TIMEOUT, |_| false)
        .clone_for_verdict();
    drop((src, dst));
    let mut verdict = judge(&src_state, &dst_state, "running", ws_pages);
    if let Some(round) = disk_round {
        verdict.failures.extend(disk_failures(&dst_state, round));
    }
    Ok(FerryOutcome {
        total_ms: report.total_ms,
        setup_ms: report.setup_ms,
        host_downtime_ms: report.blackout.host_downtime_ms,
        guest_stall_ms: verdict.guest_stall_ms,
        transferred_bytes: report.bytes_sent,
        rounds: report.rounds.len(),
        max_throttle_percent: report.max_throttle_percent,
        throughput_gbit: report.throughput_mibs * 8.0 * 1.048_576 / 1e3,
        last_src_seq: verdict.last_src_seq,
        first_dst_seq: verdict.first_dst_seq,
        dst_sweeps_verified: verdict.dst_sweeps_verified,
        errors: verdict.errors,
        verified: verdict.failures.is_empty(),
        verify_failures: verdict.failures,
        disk_blocks_checked: disk_round.map(|_| disk_checked(&dst_state)),
        wall_ms: started.elapsed().as_secs_f64() * 1e3,
        src_cpu_ms: super::cpu::source_migration_cpu_ms(&report),
        dst_cpu_ms,
        report: {
            report.timeline.clear();
            report
        },
    })
}
