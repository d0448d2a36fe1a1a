//! QEMU's own live migration of the test guest on this machine, measured
//! the way the baseline harness (`shared/qemu-baseline/migrate.py`) measures
//! it, so that `ferry bench` can put QEMU and Ferry side by side.
//!
//! One run: a source QEMU (`-S`) and a destination QEMU (`-incoming defer`)
//! start together; the source continues once both QMP sockets are attached;
//! after READY and `settle` of heartbeats the source migrates over
//! `tcp:127.0.0.1`, pre-copy only unless [`QemuMigration::postcopy`];
//! `query-migrate` is polled until it ends; then the destination's
//! heartbeats decide whether the guest really continued. The numbers QEMU
//! reports come from its final `query-migrate`; the stall is the one the
//! guest itself measured (`stall_us`).
//!
//! Post-copy is the baseline's `--mode postcopy`: `postcopy-ram` on both
//! sides, and `migrate-start-postcopy` once the first full pass is done
//! (`dirty-sync-count` >= 2) while the migration is still `active`. The
//! source's `events` capability is on in both modes, so that its `MIGRATION`
//! events fill in any status too short for the 10 ms poll to see.
//!
//! Both QEMUs are stopped (QMP `quit`, SIGKILL after 2 s) and the temporary
//! directory removed on every path out, panics included.
//!
//! With [`QemuMigration::network`] (the network row) each QEMU runs in its
//! host's namespace with a virtio-net card on that host's tap, and the
//! migration goes to host B's address instead (see [`super::qemu_net`]).

use std::collections::VecDeque;
use std::env;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ferry_testguest::console::Exit;
use serde::Serialize;
use serde_json::{json, Value};

use super::console_watch::{disk_checked, disk_failures};
use super::console_watch::{dst_done, judge, lock, Console, TAIL_LINES, VERIFY_TIMEOUT};
use super::observer::{NoObserver, RunObserver};
use super::qemu_disk::{
    connect_nbd, nbd_server_arguments, tcp_bytes, QemuDisk, QemuDiskOutcome, DRIVE_ID, JOB_ID,
    MIRROR_TIMEOUT, NBD_FD_NAME, TARGET_NODE,
};
use super::qemu_net::{spawn_on_tap, QemuNet, QemuNetError};
use super::qmp::{Qmp, QmpError};

const QEMU_BINARY: &str = "qemu-system-x86_64";
const MIB: u64 = 1 << 20;
/// The guest's pages are 4 KiB: 256 to a MiB.
const PAGES_PER_MIB: u64 = 256;
/// The baseline's bandwidth cap: high enough that loopback TCP, not QEMU's
/// 128 MiB/s default, is the limit.
const DEFAULT_MAX_BANDWIDTH: u64 = 10 << 30;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each QMP answer; all the commands used here answer at once.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// `migrate-start-postcopy` once `dirty-sync-count` reaches this: 2 is the
/// end of the first full pass (the baseline's `--postcopy-after-syncs`).
const POSTCOPY_AFTER_SYNCS: u64 = 2;
const QUIT_GRACE: Duration = Duration::from_secs(2);

/// One QEMU live migration of the test guest.
#[derive(Debug, Clone)]
pub struct QemuMigration {
    /// The same ELF file Ferry boots (QEMU enters it through its PVH note).
    pub guest_elf: PathBuf,
    /// Guest RAM; a whole number of MiB.
    pub mem_bytes: u64,
    /// E.g. `workload=dirty:256:100 cpus=1`. No `tsc_khz=`: under QEMU the
    /// guest calibrates against the PIT. Only one vCPU runs under QEMU.
    pub guest_cmdline: String,
    /// `-mem-prealloc` on both source and destination.
    pub prealloc: bool,
    /// `downtime-limit`; `None` keeps QEMU's default (300 ms in 7.2).
    pub downtime_ms: Option<u64>,
    /// `max-bandwidth` in bytes/s; `None` means 10 GiB/s like the baseline.
    /// With `postcopy`, a given value is `max-postcopy-bandwidth` too, so it
    /// caps both phases (QEMU's `max-bandwidth` only caps pre-copy); `None`
    /// leaves post-copy at QEMU's default 0, unlimited, like the baseline.
    /// In either phase QEMU sends its last `bandwidth × downtime-limit`
    /// bytes or so uncapped, in one go (its completion step): with the
    /// default 300 ms limit that is ~90 MiB at 300 MiB/s.
    pub max_bandwidth: Option<u64>,
    /// Post-copy (see the module documentation). A migration that completes
    /// before the first full pass ends never enters it:
    /// [`QemuOutcome::postcopy_started`] says whether it did.
    pub postcopy: bool,
    /// The `multifd` capability with this many `multifd-channels`, on both
    /// sides (pre-copy only: QEMU 7.2 has no multifd post-copy).
    pub multifd_channels: Option<u16>,
    /// `tls-creds-x509` on both sides (the destination checks the
    /// source's certificate), else plaintext.
    pub tls: Option<super::qemu_tls::QemuTls>,
    /// `microvm` (boots in ~0.2 s) or `q35` (~3.5 s, what the baseline used).
    pub machine: String,
    /// Heartbeats after READY before migrating.
    pub settle: Duration,
    /// From `migrate` to `completed`; past it the migration is cancelled
    /// (in post-copy that loses the guest: its RAM is split between the two).
    pub timeout: Duration,
    /// A virtio-net card on each host's tap, each QEMU in its host's
    /// namespace, the migration between the hosts' addresses; None: no
    /// card, over loopback.
    pub network: Option<QemuNet>,
    /// The local-disk row: a virtio-blk disk on each side's own image,
    /// mirrored to the destination over NBD around the migration (see
    /// [`super::qemu_disk`]); None: no disk.
    pub disk: Option<QemuDisk>,
}

impl QemuMigration {
    /// The bench's defaults: microvm, no preallocation, QEMU's downtime
    /// limit, the baseline's bandwidth cap, 1 s settle, 60 s timeout.
    pub fn new(
        guest_elf: impl Into<PathBuf>,
        mem_bytes: u64,
        guest_cmdline: impl Into<String>,
    ) -> Self {
        QemuMigration {
            guest_elf: guest_elf.into(),
            mem_bytes,
            guest_cmdline: guest_cmdline.into(),
            prealloc: false,
            downtime_ms: None,
            max_bandwidth: None,
            postcopy: false,
            multifd_channels: None,
            tls: None,
            machine: "microvm".into(),
            settle: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            network: None,
            disk: None,
        }
    }
}

/// What one migration measured. Times are milliseconds; NaN (null in JSON)
/// where there was nothing to measure.
#[derive(Debug, Clone, Serialize)]
pub struct QemuOutcome {
    /// `total-time` of QEMU's final `query-migrate` on the source (our own
    /// clock when QEMU says 0); in post-copy it includes the post-copy
    /// phase. With a disk: from the mirror's start to the destination's
    /// `cont`, the whole move.
    pub total_ms: f64,
    /// `downtime`: QEMU's own count, without the destination's resume.
    pub downtime_ms: f64,
    /// `setup-time`.
    pub setup_ms: f64,
    /// `ram.transferred`; with a disk, plus the bytes the mirror sent.
    pub transferred_bytes: u64,
    /// `ram.dirty-sync-count`: the pre-copy iterations.
    pub dirty_syncs: u64,
    /// `ram.mbps`: megabits per second.
    pub mbps: f64,
    /// Longest `stall_us` over the destination's first 5 heartbeats: the
    /// blackout the guest saw (the baseline's `hb_guest_max_gap_ms`).
    pub guest_stall_ms: f64,
    /// Host time from the last source heartbeat line to the first
    /// destination one (coarse: heartbeats come every 100 ms).
    pub host_gap_ms: f64,
    pub last_src_seq: Option<u64>,
    pub first_dst_seq: Option<u64>,
    pub dst_heartbeats: u64,
    /// Whole working sets the destination verified after its first
    /// heartbeat, i.e. wholly after the switchover: pages written since
    /// then / working-set pages (every write is preceded by a verify, and
    /// a sweep walks the pages in order, so any WS consecutive writes
    /// cover every page). 0 for a workload without a working set.
    pub dst_sweeps_verified: u64,
    /// The guest's `err` count (pages that failed verification), any side.
    pub errors: u64,
    /// The destination runs, its heartbeats continue the source's, the
    /// write counter did not go back, no errors, and for a dirty workload
    /// a whole working set was verified after the move.
    pub verified: bool,
    /// Why `verified` is false (empty when it is true).
    pub verify_failures: Vec<String>,
    /// Every migration status the source went through, in order: its
    /// `query-migrate` polls and its `MIGRATION` events together.
    pub statuses: Vec<String>,
    /// [`QemuMigration::postcopy`].
    pub postcopy: bool,
    /// From `migrate` to sending `migrate-start-postcopy`; `None` when it was
    /// not sent (post-copy off, or the migration completed first).
    pub postcopy_requested_ms: Option<f64>,
    /// QEMU's reason if it refused `migrate-start-postcopy`.
    pub postcopy_error: Option<String>,
    /// The migration went through post-copy: a `postcopy-*` status was
    /// seen, or `migrate-start-postcopy` was accepted and bytes were sent
    /// in post-copy. False when pre-copy completed first, even after
    /// `migrate-start-postcopy` (QEMU only switches while the RAM it can
    /// send in post-copy is above its downtime threshold).
    pub postcopy_started: bool,
    /// `ram.postcopy-bytes`: sent after the switch to post-copy.
    pub postcopy_bytes: u64,
    /// `ram.postcopy-requests`: pages the destination faulted on and asked
    /// the source for.
    pub postcopy_requests: u64,
    /// `downtime-limit`, `max-bandwidth` and `max-postcopy-bandwidth` as
    /// QEMU reported them before migrating (0: post-copy unlimited).
    pub downtime_limit_ms: u64,
    pub max_bandwidth: u64,
    pub max_postcopy_bandwidth: u64,
    pub qemu_version: String,
    /// From starting QEMU to the guest's READY line.
    pub boot_to_ready_ms: f64,
    /// The whole run, QEMU start and shutdown included.
    pub wall_ms: f64,
    /// The disk's mirror, with [`QemuMigration::disk`].
    pub disk: Option<QemuDiskOutcome>,
}

/// Why a QEMU migration run could not produce an outcome.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{QEMU_BINARY} not found on PATH: install with scripts/setup.sh (Debian package qemu-system-x86)")]
    QemuMissing,
    #[error("bad QEMU migration settings: {0}")]
    Config(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the {role} QEMU exited early ({status}); its output ends with:\n{tail}")]
    ExitedEarly {
        role: Role,
        status: String,
        tail: String,
    },
    #[error("QMP `{command}` on the {role} QEMU failed: {source}")]
    Qmp {
        role: Role,
        command: String,
        #[source]
        source: QmpError,
    },
    #[error("the guest did not print READY within {} s; its console ends with:\n{console_tail}", .waited.as_secs())]
    NotReady {
        waited: Duration,
        console_tail: String,
    },
    #[error("the guest on the {role} stopped: EXIT code={} reason={}", .exit.code, .exit.reason)]
    GuestExited { role: Role, exit: Exit },
    #[error("the guest printed no heartbeat in the {settle:?} after READY")]
    NoHeartbeat { settle: Duration },
    #[error("QEMU's migration ended `{status}`: {desc}")]
    MigrationFailed { status: String, desc: String },
    #[error(transparent)]
    Network(#[from] QemuNetError),
    #[error("the bench's client could not start: {0}")]
    Observer(String),
    #[error("the disk's mirror to the destination's NBD export {what}")]
    Mirror { what: String },
    #[error("the migration did not complete within {after:?} (last status `{status}`, {transferred} bytes sent); cancelled with migrate_cancel")]
    Timeout {
        after: Duration,
        status: String,
        transferred: u64,
    },
}

/// Which side of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

impl Role {
    fn tag(self) -> &'static str {
        match self {
            Role::Source => "src",
            Role::Destination => "dst",
        }
    }
}

/// `qemu-system-x86_64` from PATH.
pub fn qemu_binary() -> Result<PathBuf, QemuError> {
    let path = env::var_os("PATH").ok_or(QemuError::QemuMissing)?;
    env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(QemuError::QemuMissing)
}

/// Runs one migration; see the module documentation.
pub fn run_qemu_migration(m: &QemuMigration) -> Result<QemuOutcome, QemuError> {
    run_qemu_migration_observed(m, &mut NoObserver)
}

/// [`run_qemu_migration`], telling `observer` when the guest is up on the
/// source and when it has been verified on the destination.
pub fn run_qemu_migration_observed(
    m: &QemuMigration,
    observer: &mut dyn RunObserver,
) -> Result<QemuOutcome, QemuError> {
    let started = Instant::now();
    check_settings(m)?;
    let binary = qemu_binary()?;
    let dir = TempDir::create()?;
    let uri = match &m.network {
        Some(net) => net.incoming_uri()?,
        None => format!("tcp:127.0.0.1:{}", free_port()?),
    };
    tracing::info!(
        machine = %m.machine,
        mem_mib = m.mem_bytes / MIB,
        cmdline = %m.guest_cmdline,
        prealloc = m.prealloc,
        postcopy = m.postcopy,
        "starting source and destination QEMU"
    );
    // Declared after `dir`, so dropped (QEMU stopped) before it is removed.
    let mut src = Vm::start(&binary, m, Role::Source, dir.path())?;
    let mut dst = Vm::start(&binary, m, Role::Destination, dir.path())?;
    let result = migrate(m, &mut src, &mut dst, &uri, started, observer);
    // Both at once, so the two grace periods overlap.
    src.request_quit();
    dst.request_quit();
    drop(src);
    drop(dst);
    drop(dir);
    result.map(|mut outcome| {
        outcome.wall_ms = ms(started.elapsed());
        tracing::info!(
            total_ms = outcome.total_ms,
            downtime_ms = outcome.downtime_ms,
            guest_stall_ms = outcome.guest_stall_ms,
            postcopy_started = outcome.postcopy_started,
            verified = outcome.verified,
            "QEMU migration done"
        );
        outcome
    })
}

fn check_settings(m: &QemuMigration) -> Result<(), QemuError> {
    if m.mem_bytes == 0 || m.mem_bytes % MIB != 0 {
        return Err(QemuError::Config(format!(
            "memory must be a whole number of MiB above 0, got {} bytes",
            m.mem_bytes
        )));
    }
    if !m.guest_elf.is_file() {
        return Err(QemuError::Config(format!(
            "guest ELF {} does not exist",
            m.guest_elf.display()
        )));
    }
    if m.machine.is_empty() {
        return Err(QemuError::Config("no machine type".into()));
    }
    Ok(())
}

/// Everything after both QEMUs have started; the caller stops them.
fn migrate(
    m: &QemuMigration,
    src: &mut Vm,
    dst: &mut Vm,
    uri: &str,
    started: Instant,
    observer: &mut dyn RunObserver,
) -> Result<QemuOutcome, QemuError> {
    src.attach_qmp()?;
    dst.attach_qmp()?;
    let qemu_version = src.qmp.as_ref().and_then(Qmp::version).unwrap_or_default();
    src.execute("cont", None)?;

    // Boot.
    let ready_deadline = Instant::now() + READY_TIMEOUT;
    let state = src
        .console
        .wait_until(ready_deadline, |s| s.ready.is_some() || s.exit.is_some());
    let ready = state.ready.clone();
    drop(state);
    src.check_alive()?;
    dst.check_alive()?;
    let Some((ready_at, ready)) = ready else {
        return Err(QemuError::NotReady {
            waited: READY_TIMEOUT,
            console_tail: src.console.tail(),
        });
    };
    let boot_to_ready_ms = ms(ready_at - started);
    tracing::info!(
        boot_to_ready_ms,
        ws_mb = ready.ws_mb,
        "guest READY on the source"
    );
    observer.guest_ready().map_err(QemuError::Observer)?;

    // Settle: the workload runs at its steady rate before the migration.
    drop(
        src.console
            .wait_until(ready_at + m.settle, |s| s.exit.is_some()),
    );
    src.check_alive()?;
    dst.check_alive()?;
    let settled = src.console.lock().heartbeats.last().cloned();
    match settled {
        Some((at, hb)) if at > ready_at => {
            tracing::info!(seq = hb.seq, rate_mibs = hb.rate_mibs, "settled; migrating")
        }
        _ => return Err(QemuError::NoHeartbeat { settle: m.settle }),
    }

    // Configure: post-copy on or off on both sides (QEMU wants the same on
    // both), the baseline's bandwidth cap, and on the source the `MIGRATION`
    // events, so that no status goes unseen between two polls.
    let postcopy_ram = json!({ "capability": "postcopy-ram", "state": m.postcopy });
    let events = json!({ "capability": "events", "state": true });
    let multifd = json!({ "capability": "multifd", "state": m.multifd_channels.is_some() });
    dst.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [postcopy_ram, multifd] })),
    )?;
    src.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [postcopy_ram, events, multifd] })),
    )?;
    let mut params = json!({ "max-bandwidth": m.max_bandwidth.unwrap_or(DEFAULT_MAX_BANDWIDTH) });
    if let Some(channels) = m.multifd_channels {
        let channels = json!({ "multifd-channels": channels });
        dst.execute("migrate-set-parameters", Some(channels.clone()))?;
        params["multifd-channels"] = channels["multifd-channels"].clone();
    }
    if let (true, Some(bandwidth)) = (m.postcopy, m.max_bandwidth) {
        params["max-postcopy-bandwidth"] = json!(bandwidth);
    }
    if let Some(limit) = m.downtime_ms {
        params["downtime-limit"] = json!(limit);
    }
    if m.tls.is_some() {
        let creds = json!({ "tls-creds": super::qemu_tls::CREDS_ID });
        dst.execute("migrate-set-parameters", Some(creds))?;
        params["tls-creds"] = json!(super::qemu_tls::CREDS_ID);
    }
    src.execute("migrate-set-parameters", Some(params))?;
    let effective = src.execute("query-migrate-parameters", None)?;
    let downtime_limit_ms = effective["downtime-limit"].as_u64().unwrap_or(0);
    let max_bandwidth = effective["max-bandwidth"].as_u64().unwrap_or(0);
    let max_postcopy_bandwidth = effective["max-postcopy-bandwidth"].as_u64().unwrap_or(0);
    let mirror = match &m.disk {
        Some(disk) if disk.mirrored() => Some(start_mirror(src, dst)?),
        _ => None,
    };
    dst.execute("migrate-incoming", Some(json!({ "uri": uri })))?;

    // Migrate.
    // Events so far (the boot's RESUME and the like) are not the migration's.
    drop(src.migration_events());
    let t_migrate = Instant::now();
    src.execute("migrate", Some(json!({ "uri": uri })))?;
    let mut statuses: Vec<String> = Vec::new();
    let mut note_status = |status: &str| {
        if statuses.last().map(String::as_str) != Some(status) {
            tracing::info!(
                status,
                after_ms = ms(t_migrate.elapsed()),
                "QEMU migration status"
            );
            statuses.push(status.to_owned());
        }
    };
    let mut postcopy_requested: Option<Duration> = None;
    let mut postcopy_error: Option<String> = None;
    let (info, seen_completed) = loop {
        let info = src.execute("query-migrate", None)?;
        let status = info["status"].as_str().unwrap_or("none").to_owned();
        // Every event QEMU sent before this answer came with it, and a
        // state's event follows its change: events first, then the poll.
        for event_status in src.migration_events() {
            note_status(&event_status);
        }
        note_status(&status);
        match status.as_str() {
            "completed" => break (info, t_migrate.elapsed()),
            "failed" | "cancelled" => {
                let mut desc = info["error-desc"]
                    .as_str()
                    .unwrap_or("QEMU gave no error-desc")
                    .to_owned();
                // The usual reason for a failure on the source is the
                // destination dying; its output says why.
                if let Err(e) = dst.check_alive() {
                    desc = format!("{desc}; {e}");
                }
                return Err(QemuError::MigrationFailed { status, desc });
            }
            _ => {}
        }
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if m.postcopy
            && postcopy_requested.is_none()
            && status == "active"
            && syncs >= POSTCOPY_AFTER_SYNCS
        {
            let after = t_migrate.elapsed();
            postcopy_requested = Some(after);
            match src.execute("migrate-start-postcopy", None) {
                Ok(_) => tracing::info!(
                    after_ms = ms(after),
                    dirty_syncs = syncs,
                    "migrate-start-postcopy sent"
                ),
                // Refused (e.g. the migration had just ended): the migration
                // goes on, in pre-copy, as QEMU decides.
                Err(QemuError::Qmp {
                    source: QmpError::Command { desc, .. },
                    ..
                }) => {
                    tracing::warn!(
                        after_ms = ms(after),
                        "migrate-start-postcopy refused: {desc}"
                    );
                    postcopy_error = Some(desc);
                }
                Err(e) => return Err(e),
            }
        }
        if t_migrate.elapsed() > m.timeout {
            if let Err(e) = src.execute("migrate_cancel", None) {
                tracing::warn!("migrate_cancel: {e}");
            }
            return Err(QemuError::Timeout {
                after: m.timeout,
                status,
                transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            });
        }
        thread::sleep(POLL_INTERVAL);
    };
    let ram = &info["ram"];
    let float = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let postcopy_bytes = ram["postcopy-bytes"].as_u64().unwrap_or(0);
    let postcopy_started = statuses.iter().any(|s| s.starts_with("postcopy-"))
        || (postcopy_requested.is_some() && postcopy_error.is_none() && postcopy_bytes > 0);
    if m.postcopy && !postcopy_started {
        tracing::info!(
            requested_after_ms = postcopy_requested.map(ms),
            "the migration completed in pre-copy: post-copy never started"
        );
    }

    let finished = match (mirror, &m.disk) {
        (Some(mirror), _) => Some(finish_mirror(src, dst, mirror)?),
        // No mirror (tests): the paused destination continues all the same.
        (None, Some(_)) => {
            let completed = Instant::now();
            continue_destination(dst)?;
            Some((
                QemuDiskOutcome::unmirrored(ms(completed.elapsed())),
                f64::NAN,
            ))
        }
        (None, None) => None,
    };

    // The destination: until the guest has shown it continued (memory,
    // and a whole round of its disk checked), or 10 s.
    let ws_pages = ready.ws_mb * PAGES_PER_MIB;
    let disk_round = m.disk.as_ref().map(QemuDisk::round_blocks);
    let verify_deadline = Instant::now() + VERIFY_TIMEOUT;
    drop(dst.console.wait_until(verify_deadline, |s| {
        s.exit.is_some()
            || s.page_errors > 0
            || (dst_done(&s.heartbeats, ws_pages)
                && disk_round.is_none_or(|round| disk_checked(s) >= round))
    }));
    observer.guest_moved();
    let dst_status = match dst.execute("query-status", None) {
        Ok(v) => v["status"].as_str().unwrap_or("?").to_owned(),
        Err(e) => format!("unknown ({e})"),
    };
    let src_console = src.console.lock().clone_for_verdict();
    let dst_console = dst.console.lock().clone_for_verdict();
    let mut verdict = judge(&src_console, &dst_console, &dst_status, ws_pages);
    if let Some(round) = disk_round {
        verdict.failures.extend(disk_failures(&dst_console, round));
    }
    if !verdict.failures.is_empty() {
        tracing::warn!(
            failures = ?verdict.failures,
            "destination not verified; its console ends with:\n{}",
            dst.console.tail()
        );
    }

    let ram_bytes = ram["transferred"].as_u64().unwrap_or(0);
    let disk = finished.map(|(mut d, total)| {
        d.ram_bytes = ram_bytes;
        d.disk_blocks_checked = disk_checked(&dst_console);
        d.disk_errors = dst_console
            .disk
            .iter()
            .map(|c| c.disk_err)
            .max()
            .unwrap_or(0);
        (d, total)
    });
    Ok(QemuOutcome {
        total_ms: match &disk {
            Some((_, total)) if total.is_finite() => *total,
            _ => total_ms(&info, seen_completed),
        },
        downtime_ms: float(&info["downtime"]),
        setup_ms: float(&info["setup-time"]),
        transferred_bytes: ram_bytes + disk.as_ref().map_or(0, |(d, _)| d.mirror_bytes_sent),
        dirty_syncs: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        mbps: float(&ram["mbps"]),
        guest_stall_ms: verdict.guest_stall_ms,
        host_gap_ms: verdict.host_gap_ms,
        last_src_seq: verdict.last_src_seq,
        first_dst_seq: verdict.first_dst_seq,
        dst_heartbeats: dst_console.heartbeats.len() as u64,
        dst_sweeps_verified: verdict.dst_sweeps_verified,
        errors: verdict.errors,
        verified: verdict.failures.is_empty(),
        verify_failures: verdict.failures,
        statuses,
        postcopy: m.postcopy,
        postcopy_requested_ms: postcopy_requested.map(ms),
        postcopy_error,
        postcopy_started,
        postcopy_bytes,
        postcopy_requests: ram["postcopy-requests"].as_u64().unwrap_or(0),
        downtime_limit_ms,
        max_bandwidth,
        max_postcopy_bandwidth,
        qemu_version,
        boot_to_ready_ms,
        wall_ms: f64::NAN,
        disk: disk.map(|(d, _)| d),
    })
}

/// A mirror running from the source's disk to the destination's image.
struct Mirror {
    started: Instant,
    ready_ms: f64,
    /// The bench's copy of the NBD connection, to read its byte counts.
    nbd: TcpStream,
}

/// The destination exports its image over NBD; the source mirrors its
/// disk there until the job is READY.
fn start_mirror(src: &mut Vm, dst: &mut Vm) -> Result<Mirror, QemuError> {
    let port = free_port()?;
    dst.execute("nbd-server-start", Some(nbd_server_arguments(port)))?;
    dst.execute(
        "nbd-server-add",
        Some(json!({ "device": DRIVE_ID, "name": DRIVE_ID, "writable": true })),
    )?;
    // Events so far are the boot's.
    src.take_events();
    let started = Instant::now();
    let nbd = connect_nbd(port).map_err(|source| QemuError::Io {
        what: format!("connect to the destination's NBD server on 127.0.0.1:{port}"),
        source,
    })?;
    src.execute_with_fd("getfd", json!({ "fdname": NBD_FD_NAME }), &nbd)?;
    src.execute(
        "blockdev-add",
        Some(json!({
            "driver": "nbd",
            "node-name": TARGET_NODE,
            "server": { "type": "fd", "str": NBD_FD_NAME },
            "export": DRIVE_ID,
        })),
    )?;
    src.execute(
        "blockdev-mirror",
        Some(json!({
            "job-id": JOB_ID,
            "device": DRIVE_ID,
            "target": TARGET_NODE,
            "sync": "full",
        })),
    )?;
    let deadline = started + MIRROR_TIMEOUT;
    loop {
        match mirror_job(src)? {
            Some(job) if job["ready"] == true => break,
            Some(job) if Instant::now() > deadline => {
                return Err(QemuError::Mirror {
                    what: format!(
                        "was not READY within {MIRROR_TIMEOUT:?} ({} of {} bytes)",
                        job["offset"], job["len"]
                    ),
                })
            }
            Some(_) => {}
            None => {
                return Err(QemuError::Mirror {
                    what: format!("ended before READY: {}", job_end(src)),
                })
            }
        }
        dst.check_alive()?;
        thread::sleep(POLL_INTERVAL);
    }
    let ready_ms = ms(started.elapsed());
    tracing::info!(ready_ms, "QEMU's disk mirror READY");
    Ok(Mirror {
        started,
        ready_ms,
        nbd,
    })
}

/// After the migration: the source cancels its mirror (after READY that
/// copies what is still dirty, then stops), the destination stops its NBD
/// server and, once it has loaded the state, continues. Returns the
/// disk's figures (memory and guest ones left to the caller) and the
/// whole move's time, from the mirror's start to the `cont`.
fn finish_mirror(
    src: &mut Vm,
    dst: &mut Vm,
    mirror: Mirror,
) -> Result<(QemuDiskOutcome, f64), QemuError> {
    let completed = Instant::now();
    // The migration's events have been read; what follows is the job's.
    src.take_events();
    src.execute("block-job-cancel", Some(json!({ "device": JOB_ID })))?;
    let mut job_bytes = 0;
    let deadline = completed + MIRROR_TIMEOUT;
    while let Some(job) = mirror_job(src)? {
        job_bytes = job["offset"].as_u64().unwrap_or(job_bytes);
        if Instant::now() > deadline {
            return Err(QemuError::Mirror {
                what: format!("did not end within {MIRROR_TIMEOUT:?} of block-job-cancel"),
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
    let mirror_cancel_ms = ms(completed.elapsed());
    let end = src.take_events().into_iter().find(|e| {
        matches!(
            e["event"].as_str(),
            Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
        ) && e["data"]["device"] == JOB_ID
    });
    match &end {
        Some(e) if e["data"].get("error").is_some() => {
            return Err(QemuError::Mirror {
                what: format!("failed when cancelled: {}", e["data"]["error"]),
            })
        }
        Some(e) => job_bytes = e["data"]["offset"].as_u64().unwrap_or(job_bytes),
        None => {}
    }
    let (sent, received) = tcp_bytes(&mirror.nbd).map_err(|source| QemuError::Io {
        what: "read TCP_INFO of the mirror's NBD connection".into(),
        source,
    })?;
    drop(mirror.nbd);
    dst.execute("nbd-server-stop", None)?;
    continue_destination(dst)?;
    let total_ms = ms(mirror.started.elapsed());
    Ok((
        QemuDiskOutcome {
            mirror_ready_ms: mirror.ready_ms,
            mirror_cancel_ms,
            completion_to_cont_ms: ms(completed.elapsed()),
            mirror_bytes_sent: sent,
            mirror_bytes_received: received,
            mirror_job_bytes: job_bytes,
            ..QemuDiskOutcome::unmirrored(f64::NAN)
        },
        total_ms,
    ))
}

/// Continues the destination, paused (`-S`) after its incoming migration,
/// once it has loaded the state: the source's `completed` means all was
/// sent, not that the destination has it.
fn continue_destination(dst: &mut Vm) -> Result<(), QemuError> {
    let deadline = Instant::now() + MIRROR_TIMEOUT;
    loop {
        let info = dst.execute("query-migrate", None)?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(QemuError::MigrationFailed {
                    status: info["status"].as_str().unwrap_or("?").to_owned(),
                    desc: format!(
                        "on the destination: {}",
                        info["error-desc"].as_str().unwrap_or("QEMU gave no error-desc")
                    ),
                })
            }
            status if Instant::now() > deadline => {
                return Err(QemuError::MigrationFailed {
                    status: status.to_owned(),
                    desc: format!(
                        "the destination's incoming migration did not complete within {MIRROR_TIMEOUT:?} of the source's"
                    ),
                })
            }
            _ => thread::sleep(POLL_INTERVAL),
        }
    }
    dst.execute("cont", None)?;
    Ok(())
}

/// The mirror job as `query-block-jobs` lists it; None once it has ended.
fn mirror_job(src: &mut Vm) -> Result<Option<Value>, QemuError> {
    let jobs = src.execute("query-block-jobs", None)?;
    Ok(jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["device"] == JOB_ID))
        .cloned())
}

/// Why the mirror job ended, from its events.
fn job_end(src: &mut Vm) -> String {
    src.take_events()
        .into_iter()
        .filter(|e| e["data"]["device"] == JOB_ID || e["data"]["id"] == JOB_ID)
        .map(|e| format!("{} {}", e["event"], e["data"]))
        .next_back()
        .unwrap_or_else(|| "QEMU said nothing".into())
}

/// One QEMU process, its console and its QMP connection. Dropping it
/// stops QEMU: `quit`, then SIGKILL after [`QUIT_GRACE`].
struct Vm {
    role: Role,
    child: Child,
    qmp_path: PathBuf,
    qmp: Option<Qmp>,
    console: Arc<Console>,
    /// QEMU's stderr, last lines.
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    quit_requested: Option<Instant>,
}

impl Vm {
    fn start(binary: &Path, m: &QemuMigration, role: Role, dir: &Path) -> Result<Vm, QemuError> {
        let qmp_path = dir.join(format!("{}-qmp.sock", role.tag()));
        let mut cmd = Command::new(binary);
        cmd.args([
            "-name",
            &format!("ferry-bench-{},debug-threads=on", role.tag()),
        ])
        .args(["-accel", "kvm", "-machine", &m.machine])
        .args(["-cpu", "host,-arch-capabilities"])
        .args(["-m", &format!("{}M", m.mem_bytes / MIB), "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        // The console goes to a pipe the reader thread timestamps.
        .args(["-serial", "stdio"])
        // The guest's EXIT writes its code to port 0x501; QEMU then
        // stops instead of leaving the guest spinning.
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
        .arg("-kernel")
        .arg(&m.guest_elf)
        .args(["-append", &m.guest_cmdline])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if m.prealloc {
            cmd.arg("-mem-prealloc");
        }
        if let Some(tls) = &m.tls {
            cmd.arg("-object")
                .arg(tls.object_arg(role == Role::Destination));
        }
        if let Some(net) = &m.network {
            cmd.args(net.device_args());
        }
        if let Some(disk) = &m.disk {
            cmd.args(disk.device_args(role == Role::Destination));
        }
        match role {
            // Paused until both QMP connections are up, so the boot is timed
            // from a known point.
            Role::Source => cmd.arg("-S"),
            Role::Destination => cmd.args(["-incoming", "defer"]),
        };
        // With a disk the destination stays paused after the migration
        // until the mirror is done with its image (libvirt's `-S` too).
        if role == Role::Destination && m.disk.is_some() {
            cmd.arg("-S");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tracing::debug!(?cmd, "{role} QEMU");
        let spawned = match &m.network {
            Some(net) => spawn_on_tap(&mut cmd, net.nic(role == Role::Destination))?,
            None => cmd.spawn(),
        };
        let mut child = spawned.map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => QemuError::QemuMissing,
            _ => QemuError::Io {
                what: format!("start the {role} QEMU ({})", binary.display()),
                source,
            },
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr_pipe = child.stderr.take().expect("stderr is piped");
        let console = Console::spawn_reader(role, stdout);
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_reader = {
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || keep_tail(stderr_pipe, &stderr))
        };
        Ok(Vm {
            role,
            child,
            qmp_path,
            qmp: None,
            console,
            stderr,
            stderr_reader: Some(stderr_reader),
            quit_requested: None,
        })
    }

    /// Connects to QMP once QEMU has opened its socket.
    fn attach_qmp(&mut self) -> Result<(), QemuError> {
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        loop {
            self.check_alive()?;
            match Qmp::connect(&self.qmp_path, QMP_TIMEOUT) {
                Ok(qmp) => {
                    self.qmp = Some(qmp);
                    return Ok(());
                }
                // Not listening yet.
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(source) => return Err(self.qmp_error("connect", source)),
            }
        }
    }

    /// The statuses of the `MIGRATION` events received so far, oldest first
    /// (with the `events` capability on), and forgets all events.
    fn migration_events(&mut self) -> Vec<String> {
        let Some(qmp) = self.qmp.as_mut() else {
            return Vec::new();
        };
        qmp.take_events()
            .into_iter()
            .filter(|e| e["event"] == "MIGRATION")
            .filter_map(|e| e["data"]["status"].as_str().map(str::to_owned))
            .collect()
    }

    /// Every event received so far, and forgets them.
    fn take_events(&mut self) -> Vec<Value> {
        self.qmp.as_mut().map(Qmp::take_events).unwrap_or_default()
    }

    /// A command that hands QEMU a copy of `fd` (`getfd`).
    fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: &impl AsFd,
    ) -> Result<Value, QemuError> {
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(self.qmp_error(command, QmpError::Closed));
        };
        qmp.execute_with_fd(command, Some(arguments), fd.as_fd())
            .map_err(|source| self.qmp_error(command, source))
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(self.qmp_error(command, QmpError::Closed));
        };
        qmp.execute(command, arguments)
            .map_err(|source| self.qmp_error(command, source))
    }

    /// A QMP failure, or QEMU's own exit when that is what caused it.
    fn qmp_error(&mut self, command: &str, source: QmpError) -> QemuError {
        if !matches!(source, QmpError::Command { .. }) {
            // QEMU closes QMP a moment before it is reaped.
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if let Err(e) = self.check_alive() {
                    return e;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        QemuError::Qmp {
            role: self.role,
            command: command.to_owned(),
            source,
        }
    }

    /// `Err` if QEMU has exited (or its guest printed EXIT, after which
    /// isa-debug-exit stops QEMU).
    fn check_alive(&mut self) -> Result<(), QemuError> {
        if let Some(exit) = self.console.lock().exit.clone() {
            return Err(QemuError::GuestExited {
                role: self.role,
                exit,
            });
        }
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status)),
            Err(source) => Err(QemuError::Io {
                what: format!("wait for the {} QEMU", self.role),
                source,
            }),
        }
    }

    fn exited(&mut self, status: ExitStatus) -> QemuError {
        // The pipe closes when QEMU exits: the whole of stderr is in.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let mut tail: Vec<String> = lock(&self.stderr).iter().cloned().collect();
        if tail.is_empty() {
            tail.push("(nothing on stderr)".into());
        }
        tail.push(format!("console: {}", self.console.tail()));
        QemuError::ExitedEarly {
            role: self.role,
            status: status.to_string(),
            tail: tail.join("\n"),
        }
    }

    /// Asks QEMU to quit, without waiting for it.
    fn request_quit(&mut self) {
        if self.quit_requested.is_some() {
            return;
        }
        self.quit_requested = Some(Instant::now());
        if let Some(mut qmp) = self.qmp.take() {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            // `quit` answers and then closes the connection; an error here
            // changes nothing, SIGKILL follows if QEMU stays.
            let _ = qmp.set_timeout(QUIT_GRACE / 2);
            let _ = qmp.execute("quit", None);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.request_quit();
        let deadline = self.quit_requested.unwrap_or_else(Instant::now) + QUIT_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
        tracing::warn!(
            "the {} QEMU did not quit within {QUIT_GRACE:?}; killing it",
            self.role
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keep_tail(pipe: impl Read, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        tracing::debug!(stderr = %text, "QEMU");
        let mut tail = lock(tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
        line.clear();
    }
}

/// A port on 127.0.0.1 nobody listens on right now (the kernel's choice).
fn free_port() -> Result<u16, QemuError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| QemuError::Io {
            what: "find a free TCP port on 127.0.0.1".into(),
            source,
        })
}

/// A fresh directory for the QMP sockets, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<TempDir, QemuError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = env::temp_dir().join(format!("ferry-qemu-{}-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                // Left by an earlier process with the same pid.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(QemuError::Io {
                        what: format!("create {}", path.display()),
                        source,
                    })
                }
            }
        }
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// QEMU's `total-time`; some runs (multifd ones, notably) report 0, and
/// then our own clock from `migrate` to the poll that saw "completed"
/// stands in (late by at most one poll interval).
fn total_ms(info: &Value, seen_completed: Duration) -> f64 {
    match info["total-time"].as_f64() {
        Some(t) if t > 0.0 => t,
        _ => ms(seen_completed),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::console_watch::ConsoleState;
    use ferry_testguest::console::Heartbeat;

    fn kvm() -> bool {
        let present = Path::new("/dev/kvm").exists();
        if !present {
            eprintln!("SKIPPED: /dev/kvm missing");
        }
        present
    }

    fn qemu() -> bool {
        let present = qemu_binary().is_ok();
        if !present {
            eprintln!("SKIPPED: {QEMU_BINARY} not on PATH");
        }
        present
    }

    fn migration(cmdline: &str) -> QemuMigration {
        QemuMigration {
            settle: Duration::from_secs(1),
            ..QemuMigration::new(ferry_testguest::guest_elf_path(), 512 * MIB, cmdline)
        }
    }

    #[test]
    fn qemu_migrates_dirty_guest() {
        if !kvm() {
            return;
        }
        let m = migration("workload=dirty:64:100 cpus=1");
        let outcome = run_qemu_migration(&m).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}", serde_json::to_string_pretty(&outcome).unwrap());
        assert!(outcome.verified, "{:?}", outcome.verify_failures);
        assert_eq!(outcome.errors, 0);
        assert!(
            outcome.transferred_bytes > 64 * MIB,
            "{}",
            outcome.transferred_bytes
        );
        assert!(
            outcome.guest_stall_ms < 1000.0,
            "{}",
            outcome.guest_stall_ms
        );
        assert!(outcome.dst_sweeps_verified >= 1);
    }

    /// An unthrottled writer against a 300 MiB/s cap cannot converge in
    /// pre-copy, so post-copy must start after the first pass.
    #[test]
    fn qemu_postcopy_migrates_max_rate_guest() {
        if !kvm() || !qemu() {
            return;
        }
        let cap = 300 * MIB;
        let m = QemuMigration {
            mem_bytes: 1024 * MIB,
            postcopy: true,
            max_bandwidth: Some(cap),
            downtime_ms: Some(super::super::POSTCOPY_QEMU_DOWNTIME_MS),
            ..migration("workload=dirty:256:max cpus=1")
        };
        let outcome = run_qemu_migration(&m).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{}", serde_json::to_string_pretty(&outcome).unwrap());
        assert!(outcome.verified, "{:?}", outcome.verify_failures);
        assert_eq!(outcome.errors, 0);
        assert_eq!(outcome.max_bandwidth, cap);
        assert_eq!(outcome.max_postcopy_bandwidth, cap);
        assert!(outcome.postcopy_requested_ms.is_some());
        assert_eq!(outcome.postcopy_error, None);
        assert!(outcome.postcopy_started, "{:?}", outcome.statuses);
        assert!(
            outcome.statuses.iter().any(|s| s == "postcopy-active"),
            "{:?}",
            outcome.statuses
        );
        assert_eq!(
            outcome.statuses.last().map(String::as_str),
            Some("completed")
        );
    }

    /// The local-disk row's move: with the mirror the destination's guest
    /// checks a whole round of its disk, no bad block; without it (the
    /// destination's image left empty) the same run must not verify.
    #[test]
    fn qemu_moves_a_disk_with_its_mirror_and_a_lost_mirror_is_caught() {
        if !kvm() || !qemu() {
            return;
        }
        let dir = TempDir::create().unwrap();
        let run = |tag: &str, mirrored: bool| {
            let (image, copy) = (
                dir.path().join(format!("{tag}.img")),
                dir.path().join(format!("{tag}-on-b.img")),
            );
            for p in [&image, &copy] {
                fs::File::create(p).unwrap().set_len(16 * MIB).unwrap();
            }
            let disk = QemuDisk::new(image, copy, 1);
            let m = QemuMigration {
                disk: Some(if mirrored {
                    disk
                } else {
                    disk.without_mirror()
                }),
                ..migration("workload=dirty:64:100 cpus=1 disk=1:max")
            };
            run_qemu_migration(&m).unwrap_or_else(|e| panic!("{tag}: {e}"))
        };

        let good = run("mirrored", true);
        eprintln!("{}", serde_json::to_string_pretty(&good).unwrap());
        assert!(good.verified, "{:?}", good.verify_failures);
        let d = good.disk.as_ref().expect("disk figures");
        assert!(d.disk_blocks_checked >= 256, "{d:?}");
        assert_eq!(d.disk_errors, 0);
        assert!(d.mirror_bytes_sent >= MIB, "{d:?}");
        assert_eq!(good.transferred_bytes, d.ram_bytes + d.mirror_bytes_sent);
        assert!(good.total_ms >= d.mirror_ready_ms, "{good:?}");

        let lost = run("unmirrored", false);
        eprintln!("without the mirror: {:?}", lost.verify_failures);
        assert!(
            !lost.verified,
            "a destination without the disk's blocks verified"
        );
        let d = lost.disk.as_ref().expect("disk figures");
        assert!(d.disk_errors > 0, "{d:?}");
        assert!(
            lost.verify_failures
                .iter()
                .any(|f| f.contains("bad disk blocks")),
            "{:?}",
            lost.verify_failures
        );
        // Memory moved fine: only the disk is wrong.
        assert_eq!(lost.errors, 0);
    }

    #[test]
    fn errors_say_what_went_wrong() {
        if !kvm() {
            return;
        }
        let err = run_qemu_migration(&QemuMigration {
            machine: "no-such-machine".into(),
            ..migration("workload=idle")
        })
        .unwrap_err();
        assert!(
            matches!(&err, QemuError::ExitedEarly { role: Role::Source, tail, .. } if tail.contains("unsupported machine type")),
            "{err}"
        );

        let err = run_qemu_migration(&migration("workload=dirty:64:fast")).unwrap_err();
        assert!(
            matches!(&err, QemuError::GuestExited { exit, .. } if exit.code == 1),
            "{err}"
        );

        // 1 MiB/s cannot move 64 MiB in a second.
        let err = run_qemu_migration(&QemuMigration {
            max_bandwidth: Some(MIB),
            timeout: Duration::from_secs(1),
            ..migration("workload=dirty:64:100")
        })
        .unwrap_err();
        assert!(matches!(err, QemuError::Timeout { .. }), "{err}");
    }

    fn hb(seq: u64, wr: u64, stall_us: u64) -> (Instant, Heartbeat) {
        let hb = Heartbeat {
            seq,
            t_ms: seq * 100,
            wr,
            ver: wr,
            err: 0,
            sweeps: 0,
            fsweeps: 0,
            stall_us,
            rate_mibs: 100,
        };
        (Instant::now(), hb)
    }

    fn console(heartbeats: Vec<(Instant, Heartbeat)>) -> ConsoleState {
        ConsoleState {
            heartbeats,
            ..Default::default()
        }
    }

    #[test]
    fn judges_continuity_and_the_sweep_after_the_move() {
        let src = console(vec![hb(9, 900, 40), hb(10, 1000, 40)]);
        let dst = console(
            (11..17)
                .map(|s| hb(s, s * 100 + 50, if s == 11 { 80_000 } else { 50 }))
                .collect(),
        );
        let v = judge(&src, &dst, "running", 500);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.guest_stall_ms, 80.0);
        assert_eq!(v.dst_sweeps_verified, 1);

        // Not yet a whole working set since the first destination heartbeat.
        let v = judge(&src, &dst, "running", 501);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);

        // A skipped heartbeat is only fine when its cut tail is there.
        let mut dst2 = console((12..18).map(|s| hb(s, s * 100, 50)).collect());
        assert!(!judge(&src, &dst2, "running", 0).failures.is_empty());
        dst2.other_before_first_hb = true;
        assert!(judge(&src, &dst2, "running", 0).failures.is_empty());

        // A restarted guest, a paused destination.
        let dst3 = console((0..6).map(|s| hb(s, s * 100, 50)).collect());
        let v = judge(&src, &dst3, "paused", 0);
        assert_eq!(v.failures.len(), 3, "{:?}", v.failures);
    }
}
