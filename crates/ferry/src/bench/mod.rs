//! `ferry bench`: Ferry and QEMU's own live migration side by side on this
//! machine, on the same guest ELF, memory and preallocation policy, over
//! loopback (the network row: between two hosts' namespaces); medians per
//! row and the Ferry/QEMU ratios.

pub mod console_watch;
pub mod cpu;
pub mod ferry_side;
pub mod iperf;
pub mod network;
pub mod observer;
pub mod qemu;
pub mod qemu_disk;
pub mod qemu_net;
pub mod qemu_tls;
pub mod qmp;
pub mod storage;
pub mod table;
pub mod tls_cost;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_migration::mode::Mode;

use crate::migration::priority::CpuPriority;
use ferry_testguest::workload::Workload;
use serde::Serialize;

use ferry_side::{run_ferry_migration, FerryMigration, FerryOutcome};
use qemu::{run_qemu_migration, QemuMigration, QemuOutcome};

/// One comparison: the same guest and policy for both engines.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub mem_bytes: u64,
    pub workload: String,
    pub prealloc: bool,
    /// The downtime target given to both; None: each engine's default
    /// (Ferry 20 ms, QEMU 300 ms), as a user who sets nothing gets.
    pub downtime_ms: Option<u64>,
    /// Ferry's mode; any mode but pre-copy runs QEMU with post-copy on
    /// (`migrate-start-postcopy` after its first full pass).
    pub mode: Mode,
    /// Send-rate cap given to both (QEMU: max-bandwidth and
    /// max-postcopy-bandwidth); None: no cap (QEMU: 10 GiB/s).
    pub bandwidth: Option<u64>,
    /// Ferry's `--streams` (None: auto) and, when set, QEMU's multifd
    /// channels, so both engines get the same number of connections.
    pub streams: Option<u16>,
    /// Ferry's `--priority` on both sides. QEMU's threads always run at
    /// normal priority, which is what `migration` gives Ferry's.
    pub priority: CpuPriority,
    /// The guest's vCPUs (Ferry; QEMU's guest runs on its boot vCPU).
    pub vcpus: u32,
    /// Whether QEMU runs this row too.
    pub qemu: bool,
    /// Both engines over mutual TLS with a CA made for the run, instead of
    /// plaintext: Ferry's TLS 1.3 (rustls), QEMU's `tls-creds-x509`
    /// (GnuTLS) with the same certificates.
    pub tls: bool,
    /// The network row: the guest also serves a TCP and a UDP echo on a
    /// virtio-net card, on the netlab topology, probed by a client while
    /// it migrates from host A to host B (see [`network`]).
    pub network: bool,
    /// The storage rows: the guest also writes and checks a disk, shared or
    /// copied, and the same VM moves without it too (see [`storage`]).
    pub disk: Option<storage::DiskRow>,
}

impl Row {
    /// The downtime target each engine works to: the row's, or its default.
    pub fn targets_ms(&self) -> (f64, f64) {
        match self.downtime_ms {
            Some(d) => (d as f64, d as f64),
            None => (
                FERRY_DEFAULT_DOWNTIME.as_secs_f64() * 1e3,
                QEMU_DEFAULT_DOWNTIME_MS,
            ),
        }
    }

    /// Ferry's migration of this row (over loopback, no card), with
    /// `disk` for the storage rows.
    pub fn ferry_migration(
        &self,
        workload: Workload,
        disk: Option<ferry_side::BenchDisk>,
    ) -> FerryMigration {
        FerryMigration {
            mem_bytes: self.mem_bytes,
            workload,
            prealloc: self.prealloc,
            downtime: self
                .downtime_ms
                .map_or(FERRY_DEFAULT_DOWNTIME, Duration::from_millis),
            bandwidth: self.bandwidth,
            settle: Duration::from_secs(1),
            mode: self.mode,
            streams: self.streams,
            priority: self.priority,
            vcpus: self.vcpus,
            tls: self.tls,
            net: None,
            disk,
        }
    }

    /// A row that moves memory in bulk, set against the loopback limit.
    pub fn is_throughput_row(&self) -> bool {
        self.name.starts_with("fill-")
    }
}

/// QEMU's downtime-limit on the post-copy rows. With its default (300 ms)
/// and a 300 MiB/s cap, QEMU 10 may finish in pre-copy before the switch
/// to post-copy it was asked for takes effect (anything under bandwidth x
/// limit = 90 MiB goes in one blackout), and the row would not compare
/// post-copy at all. Ferry's default target keeps it in post-copy.
pub const POSTCOPY_QEMU_DOWNTIME_MS: u64 = 20;

/// QEMU's default downtime-limit.
pub const QEMU_DEFAULT_DOWNTIME_MS: f64 = 300.0;

pub fn rows() -> Vec<Row> {
    let row = |name, workload: &str, prealloc, downtime_ms| Row {
        name,
        mem_bytes: 1 << 30,
        workload: workload.into(),
        prealloc,
        downtime_ms,
        mode: Mode::Precopy,
        bandwidth: None,
        streams: None,
        priority: CpuPriority::Guest,
        vcpus: 1,
        qemu: true,
        tls: false,
        network: false,
        disk: None,
    };
    let capped = |name, mode| Row {
        mode,
        bandwidth: Some(300 << 20),
        ..row(name, "dirty:256:max", false, None)
    };
    vec![
        row("idle", "idle", false, None),
        row("dirty-100", "dirty:256:100", false, None),
        row("dirty-1024-10ms", "dirty:256:1024", false, Some(10)),
        // Under QEMU the guest runs on its boot vCPU only: Ferry alone.
        Row {
            vcpus: 2,
            qemu: false,
            ..row("dirty-1024-10ms-2vcpu", "dirty:256:1024", false, Some(10))
        },
        row("fill-768-prealloc", "dirty:0:1:768", true, None),
        Row {
            streams: Some(FILL_STREAMS),
            priority: CpuPriority::Migration,
            ..row("fill-768-prealloc-4streams", "dirty:0:1:768", true, None)
        },
        // The same fills over mutual TLS 1.3, beside the plaintext rows.
        Row {
            streams: Some(1),
            tls: true,
            ..row("fill-768-prealloc-tls", "dirty:0:1:768", true, None)
        },
        Row {
            streams: Some(FILL_STREAMS),
            priority: CpuPriority::Migration,
            tls: true,
            ..row(
                "fill-768-prealloc-tls-4streams",
                "dirty:0:1:768",
                true,
                None,
            )
        },
        capped("postcopy-max-300MiBs", Mode::Postcopy),
        capped("hybrid-max-300MiBs", Mode::Hybrid),
        capped("auto-max-300MiBs", Mode::Auto),
        // Pre-copy with each engine's defaults, on the netlab topology.
        Row {
            network: true,
            ..row(network::ROW, "dirty:64:100", false, None)
        },
        // The same VM with a disk and without; shared: Ferry alone.
        Row {
            disk: Some(storage::DiskRow::Shared),
            qemu: false,
            ..row("disk-shared", "dirty:64:100", false, None)
        },
        // Copied: QEMU mirrors the same disk over NBD.
        Row {
            disk: Some(storage::DiskRow::Local),
            ..row("disk-local", "dirty:64:100", false, None)
        },
    ]
}

/// Streams (QEMU: multifd channels) of the multi-stream fill row.
const FILL_STREAMS: u16 = 4;

/// Ferry's default `--downtime`.
pub const FERRY_DEFAULT_DOWNTIME: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Serialize)]
pub struct Medians {
    pub total_ms: f64,
    pub guest_stall_ms: f64,
    pub transferred_mib: f64,
    pub throughput_gbit: f64,
    pub verified: String,
}

/// How many runs kept the row's downtime target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetKept {
    pub target_ms: f64,
    pub runs: usize,
    /// Host-side downtime within the target (Ferry only: QEMU reports no
    /// figure measured the same way).
    pub host_side: Option<usize>,
    pub guest_seen: usize,
}

impl TargetKept {
    pub fn show(&self) -> String {
        match self.host_side {
            Some(h) => format!("{h}/{} / {}/{}", self.runs, self.guest_seen, self.runs),
            None => format!("- / {}/{}", self.guest_seen, self.runs),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RowResult {
    pub row: Row,
    pub ferry_runs: Vec<FerryOutcome>,
    pub qemu_runs: Vec<QemuOutcome>,
    pub ferry_errors: Vec<String>,
    pub qemu_errors: Vec<String>,
    pub ferry: Option<Medians>,
    pub qemu: Option<Medians>,
    /// Ferry / QEMU: below 1 means Ferry is faster, stalls less, sends less.
    pub ratio_total: Option<f64>,
    pub ratio_stall: Option<f64>,
    pub ratio_bytes: Option<f64>,
    pub ferry_target: Option<TargetKept>,
    pub qemu_target: Option<TargetKept>,
    /// Ferry's median throughput as a fraction of iperf3's on as many
    /// streams, in the same run (throughput rows only).
    pub ferry_of_loopback: Option<f64>,
    pub qemu_of_loopback: Option<f64>,
    /// The network row's client figures and targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<network::NetworkResult>,
    /// The storage rows' figures with and without the disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<storage::StorageResult>,
}

/// What a whole bench run measured.
#[derive(Debug, Serialize)]
pub struct BenchResults {
    pub loopback: Option<iperf::LoopbackLimit>,
    pub loopback_error: Option<String>,
    pub rows: Vec<RowResult>,
    /// Each TLS row beside its plaintext twin, when both ran.
    pub tls_costs: Vec<tls_cost::TlsCost>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One run's figures, whichever engine made them.
struct Figures {
    total_ms: f64,
    guest_stall_ms: f64,
    transferred_bytes: u64,
    throughput_gbit: f64,
    verified: bool,
}

impl From<&FerryOutcome> for Figures {
    fn from(r: &FerryOutcome) -> Self {
        Self {
            total_ms: r.total_ms,
            guest_stall_ms: r.guest_stall_ms,
            transferred_bytes: r.transferred_bytes,
            throughput_gbit: r.throughput_gbit,
            verified: r.verified,
        }
    }
}

impl From<&QemuOutcome> for Figures {
    fn from(r: &QemuOutcome) -> Self {
        Self {
            total_ms: r.total_ms,
            guest_stall_ms: r.guest_stall_ms,
            transferred_bytes: r.transferred_bytes,
            throughput_gbit: r.mbps / 1e3,
            verified: r.verified,
        }
    }
}

fn medians<'a, T: 'a>(runs: &'a [T]) -> Option<Medians>
where
    &'a T: Into<Figures>,
{
    let runs: Vec<Figures> = runs.iter().map(Into::into).collect();
    let of = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    (!runs.is_empty()).then(|| Medians {
        total_ms: of(|r| r.total_ms),
        guest_stall_ms: of(|r| r.guest_stall_ms),
        transferred_mib: of(|r| r.transferred_bytes as f64 / (1 << 20) as f64),
        throughput_gbit: of(|r| r.throughput_gbit),
        verified: format!(
            "{}/{}",
            runs.iter().filter(|r| r.verified).count(),
            runs.len()
        ),
    })
}

/// Runs every row `reps` times on each engine, alternating them so that
/// machine noise hits both alike.
pub fn run_rows(
    rows: &[Row],
    reps: usize,
    with_qemu: bool,
    with_iperf: bool,
    on_run: &mut dyn FnMut(&str),
) -> anyhow::Result<BenchResults> {
    let dir = TempDir::new()?;
    let elf = dir.path().join("ferry-guest.elf");
    std::fs::write(&elf, ferry_testguest::GUEST_ELF).context("writing the guest ELF for QEMU")?;
    if with_qemu {
        qemu::qemu_binary()?;
    }
    let (loopback, loopback_error) = if with_iperf {
        on_run("iperf3: loopback TCP, 1 and 4 streams");
        match iperf::measure() {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };
    let mut results = Vec::new();
    for row in rows {
        let with_qemu = with_qemu && row.qemu;
        let workload: Workload = row.workload.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut result = RowResult {
            row: row.clone(),
            ferry_runs: Vec::new(),
            qemu_runs: Vec::new(),
            ferry_errors: Vec::new(),
            qemu_errors: Vec::new(),
            ferry: None,
            qemu: None,
            ratio_total: None,
            ratio_stall: None,
            ratio_bytes: None,
            ferry_target: None,
            qemu_target: None,
            ferry_of_loopback: None,
            qemu_of_loopback: None,
            network: None,
            storage: None,
        };
        if let Some(kind) = row.disk {
            let elf = with_qemu.then_some(elf.as_path());
            storage::run_row(&mut result, kind, workload, reps, dir.path(), elf, on_run);
        } else if row.network {
            network::run_row(
                &mut result,
                workload,
                reps,
                with_qemu,
                &elf,
                dir.path(),
                on_run,
            );
        } else {
            for rep in 1..=reps {
                on_run(&format!("{} ferry {rep}/{reps}", row.name));
                let m = row.ferry_migration(workload, None);
                match run_ferry_migration(&m, dir.path()) {
                    Ok(o) => result.ferry_runs.push(o),
                    Err(e) => result.ferry_errors.push(format!("{e:#}")),
                }
                if with_qemu {
                    on_run(&format!("{} qemu {rep}/{reps}", row.name));
                    let mut q = QemuMigration::new(
                        &elf,
                        row.mem_bytes,
                        ferry_testguest::guest_cmdline(&workload, 1, None),
                    );
                    q.prealloc = row.prealloc;
                    q.postcopy = row.mode != Mode::Precopy;
                    q.downtime_ms = match (row.downtime_ms, q.postcopy) {
                        (None, true) => Some(POSTCOPY_QEMU_DOWNTIME_MS),
                        (d, _) => d,
                    };
                    // One stream is QEMU's main channel; multifd is for several.
                    q.multifd_channels = row.streams.filter(|&n| n > 1);
                    if row.tls {
                        q.tls = Some(ferry_side::qemu_tls_for_run(dir.path())?);
                    }
                    if row.bandwidth.is_some() {
                        q.max_bandwidth = row.bandwidth;
                    }
                    match run_qemu_migration(&q) {
                        Ok(o) => result.qemu_runs.push(o),
                        Err(e) => result.qemu_errors.push(e.to_string()),
                    }
                }
            }
        }
        result.ferry = medians(&result.ferry_runs);
        result.qemu = medians(&result.qemu_runs);
        if let (Some(f), Some(q)) = (&result.ferry, &result.qemu) {
            let ratio = |a: f64, b: f64| (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b);
            result.ratio_total = ratio(f.total_ms, q.total_ms);
            result.ratio_stall = ratio(f.guest_stall_ms, q.guest_stall_ms);
            result.ratio_bytes = ratio(f.transferred_mib, q.transferred_mib);
        }
        let (ferry_target_ms, qemu_target_ms) = row.targets_ms();
        let kept = |stalls: &mut dyn Iterator<Item = f64>, target: f64| {
            stalls.filter(|s| s.is_finite() && *s <= target).count()
        };
        if !result.ferry_runs.is_empty() {
            let runs = &result.ferry_runs;
            result.ferry_target = Some(TargetKept {
                target_ms: ferry_target_ms,
                runs: runs.len(),
                host_side: Some(kept(
                    &mut runs.iter().map(|o| o.host_downtime_ms),
                    ferry_target_ms,
                )),
                guest_seen: kept(&mut runs.iter().map(|o| o.guest_stall_ms), ferry_target_ms),
            });
        }
        if !result.qemu_runs.is_empty() {
            let runs = &result.qemu_runs;
            result.qemu_target = Some(TargetKept {
                target_ms: qemu_target_ms,
                runs: runs.len(),
                host_side: None,
                guest_seen: kept(&mut runs.iter().map(|o| o.guest_stall_ms), qemu_target_ms),
            });
        }
        if let (Some(limit), true) = (&loopback, row.is_throughput_row()) {
            let gbit = limit.for_streams(row.streams.unwrap_or(1));
            let of = |m: &Option<Medians>| m.as_ref().map(|m| m.throughput_gbit / gbit);
            result.ferry_of_loopback = of(&result.ferry);
            result.qemu_of_loopback = of(&result.qemu);
        }
        results.push(result);
    }
    Ok(BenchResults {
        loopback,
        loopback_error,
        tls_costs: tls_cost::pairs(&results),
        rows: results,
    })
}

/// A private directory for sockets and the guest file, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
