//! One Ferry migration measured the way the QEMU side is: a `ferry run`
//! and a `ferry receive` as separate processes, the guest consoles read
//! off their stdout, the migration driven over the source's API socket.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_migration::stats::MigrationReport;
use ferry_testguest::workload::Workload;
use serde::Serialize;

use super::console_watch::{dst_done, judge, Console, VERIFY_TIMEOUT};
use crate::api::call;
use crate::control::{MigrateRequest, Request, Response};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct FerryMigration {
    pub mem_bytes: u64,
    pub workload: Workload,
    pub prealloc: bool,
    pub downtime: Duration,
    pub bandwidth: Option<u64>,
    pub settle: Duration,
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
    pub wall_ms: f64,
    /// Ferry's own report (rounds, blackout parts), without its timeline.
    pub report: MigrationReport,
}

/// A child `ferry` process, stopped (SIGTERM, then SIGKILL) when dropped.
struct FerryChild {
    child: Child,
    console: Arc<Console>,
    status_lines: mpsc::Receiver<String>,
}

impl FerryChild {
    fn spawn(name: &'static str, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the ferry binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let console = Console::spawn_reader(name, child.stdout.take().expect("piped"));
        let stderr = child.stderr.take().expect("piped");
        let (tx, status_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::debug!(%name, %line, "ferry child");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            console,
            status_lines,
        })
    }

    /// The first status line (stderr) that starts with `prefix`.
    fn wait_status(&self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.status_lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("no '{prefix}' line within {timeout:?}"),
            }
        }
    }
}

impl Drop for FerryChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_ferry_migration(m: &FerryMigration, dir: &Path) -> anyhow::Result<FerryOutcome> {
    let started = Instant::now();
    let socket: PathBuf = dir.join(format!("src-{}.sock", std::process::id()));
    let mem = format!("{}M", m.mem_bytes >> 20);
    // The destination reserves its memory up front, as QEMU's does.
    let mut dst_args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--mem".into(),
        mem.clone(),
    ];
    let mut src_args: Vec<String> = vec![
        "run".into(),
        "--mem".into(),
        mem,
        "--workload".into(),
        m.workload.to_string(),
        "--api".into(),
        socket.display().to_string(),
    ];
    if m.prealloc {
        dst_args.push("--prealloc".into());
        src_args.push("--prealloc".into());
    }
    let dst = FerryChild::spawn("ferry-dst", &dst_args)?;
    // Printed once the memory is reserved.
    let listening = dst.wait_status("ferry: listening on ", Duration::from_secs(60))?;
    let addr = listening["ferry: listening on ".len()..].trim().to_string();
    let src = FerryChild::spawn("ferry-src", &src_args)?;
    let ready = src
        .console
        .wait_until(Instant::now() + READY_TIMEOUT, |s| s.ready.is_some())
        .ready
        .clone();
    let Some((_, ready)) = ready else {
        bail!("the source guest printed no READY within {READY_TIMEOUT:?}");
    };
    std::thread::sleep(m.settle);
    let request = Request::Migrate(MigrateRequest {
        to: addr,
        downtime_ms: m.downtime.as_secs_f64() * 1e3,
        bandwidth: m.bandwidth,
        auto_converge: true,
    });
    let mut report = match call(&socket, &request)? {
        Response::Migrated(r) => *r,
        Response::MigrationFailed { reason, .. } => {
            return Err(anyhow!("Ferry's migration failed: {reason}"))
        }
        other => bail!("unexpected answer: {other:?}"),
    };
    let ws_pages = ready.ws_mb * 256;
    let dst_state = dst
        .console
        .wait_until(Instant::now() + VERIFY_TIMEOUT, |s| {
            dst_done(&s.heartbeats, ws_pages)
        })
        .clone_for_verdict();
    let src_state = src.console.lock().clone_for_verdict();
    let verdict = judge(&src_state, &dst_state, "running", ws_pages);
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
        wall_ms: started.elapsed().as_secs_f64() * 1e3,
        report: {
            report.timeline.clear();
            report
        },
    })
}
