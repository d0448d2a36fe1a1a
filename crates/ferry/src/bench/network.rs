//! The network row of `ferry bench` (issue 15): the VM's network identity
//! across a migration, Ferry against QEMU on the netlab topology (hosts A
//! and B, a client, two tiers of bridges).
//!
//! One run, for either engine: a fresh topology; the VM (the same guest
//! ELF, serving a numbered TCP echo and a UDP echo besides its dirtying
//! workload) starts on host A's tap; once it is READY the client starts
//! netlab's probe (one TCP request and one UDP probe every millisecond,
//! over one connection); the VM migrates to host B (pre-copy, each
//! engine's defaults) between the hosts' addresses; once the destination's
//! guest has verified its memory the client goes on for a second, stops
//! and reports. Then everything is removed: the probe, the VMs (by their
//! runners) and the topology (its guard), also when a step fails.
//!
//! The row needs root (namespaces, bridges, taps); without it, or without
//! QEMU, it says SKIPPED instead of passing.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ferry_migration::mode::Mode;
use ferry_netlab::{Host, MacAddr, Probe, ProbeConfig, ProbeReport, Topology};
use ferry_testguest::net::{GuestWorkload, NetEcho};
use ferry_testguest::workload::Workload;
use serde::Serialize;

use super::ferry_side::{run_ferry_migration_observed, FerryMigration, FerryNet, FerryOutcome};
use super::observer::RunObserver;
use super::qemu::{qemu_binary, run_qemu_migration_observed, QemuMigration, QemuOutcome};
use super::qemu_net::{QemuNet, QemuNic};
use super::{median, Row, RowResult, FERRY_DEFAULT_DOWNTIME};
use crate::migration::priority::CpuPriority;

/// The row's name.
pub const ROW: &str = "network";
/// The guest's TCP and UDP echo port.
const PORT: u16 = 7000;
/// The card's MAC on both engines (locally administered).
const MAC: MacAddr = MacAddr([0x02, 0x46, 0x52, 0x00, 0x0b, 0x02]);
/// Traffic on host B after the guest verified there, before the client
/// stops (replies still on their way get the probe's own drain on top).
const AFTER_MOVE: Duration = Duration::from_secs(1);
/// The probe stops by itself after this long, whatever happens.
const PROBE_LIMIT: Duration = Duration::from_secs(120);
/// The allowance: the longest TCP reply gap may exceed the
/// guest-seen stall by this much.
pub const GAP_OVER_STALL_MS: f64 = 2.0;

/// What the client saw during one migration, beside the guest's stall.
#[derive(Debug, Clone, Serialize)]
pub struct NetRun {
    pub rep: usize,
    pub connection_kept: bool,
    pub tcp_requests_sent: u64,
    /// Requests never answered.
    pub tcp_requests_lost: u64,
    pub tcp_resets: u64,
    pub tcp_longest_gap_ms: Option<f64>,
    /// TCP_INFO tcpi_total_retrans of the client's socket.
    pub tcp_retransmissions: u32,
    pub udp_probes_sent: u64,
    pub udp_probes_lost: u64,
    pub udp_longest_gap_ms: Option<f64>,
    /// The longest stall the guest measured itself after the move.
    pub guest_stall_ms: f64,
    /// The client's whole report.
    pub probe: ProbeReport,
}

impl NetRun {
    fn new(rep: usize, guest_stall_ms: f64, probe: ProbeReport) -> Self {
        let ms = |us: u64| us as f64 / 1e3;
        let tcp = probe.tcp.as_ref();
        let udp = probe.udp.as_ref();
        NetRun {
            rep,
            connection_kept: tcp.is_some_and(|t| t.connection_kept),
            tcp_requests_sent: tcp.map_or(0, |t| t.requests_sent),
            tcp_requests_lost: tcp.map_or(0, |t| t.replies_missing),
            tcp_resets: tcp.map_or(0, |t| t.resets),
            tcp_longest_gap_ms: tcp
                .and_then(|t| t.longest_gap.as_ref())
                .map(|g| ms(g.longest_us)),
            tcp_retransmissions: tcp.map_or(0, |t| t.retransmissions),
            udp_probes_sent: udp.map_or(0, |u| u.probes_sent),
            udp_probes_lost: udp.map_or(0, |u| u.lost),
            udp_longest_gap_ms: udp
                .and_then(|u| u.longest_gap.as_ref())
                .map(|g| ms(g.longest_us)),
            guest_stall_ms,
            probe,
        }
    }

    /// How far the longest TCP gap exceeds the guest-seen stall.
    fn gap_over_stall_ms(&self) -> Option<f64> {
        self.tcp_longest_gap_ms
            .filter(|_| self.guest_stall_ms.is_finite())
            .map(|g| g - self.guest_stall_ms)
    }
}

/// One engine's runs in a few figures: medians of the gaps and the stall,
/// sums of what was lost.
#[derive(Debug, Clone, Serialize)]
pub struct NetSummary {
    pub runs: usize,
    pub connections_kept: usize,
    pub tcp_resets: u64,
    pub tcp_requests_lost: u64,
    pub tcp_retransmissions: u64,
    pub udp_probes_lost: u64,
    pub tcp_longest_gap_ms: f64,
    pub udp_longest_gap_ms: f64,
    pub guest_stall_ms: f64,
}

impl NetSummary {
    fn of(runs: &[NetRun]) -> Option<Self> {
        let med = |f: fn(&NetRun) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        (!runs.is_empty()).then(|| NetSummary {
            runs: runs.len(),
            connections_kept: runs.iter().filter(|r| r.connection_kept).count(),
            tcp_resets: runs.iter().map(|r| r.tcp_resets).sum(),
            tcp_requests_lost: runs.iter().map(|r| r.tcp_requests_lost).sum(),
            tcp_retransmissions: runs.iter().map(|r| u64::from(r.tcp_retransmissions)).sum(),
            udp_probes_lost: runs.iter().map(|r| r.udp_probes_lost).sum(),
            tcp_longest_gap_ms: med(|r| r.tcp_longest_gap_ms),
            udp_longest_gap_ms: med(|r| r.udp_longest_gap_ms),
            guest_stall_ms: med(|r| Some(r.guest_stall_ms)),
        })
    }
}

/// One of the targets and whether this run of the bench kept it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    /// None: not measured (no runs of an engine it needs).
    pub kept: Option<bool>,
    pub measured: String,
}

impl TargetCheck {
    pub fn verdict(&self) -> &'static str {
        match self.kept {
            Some(true) => "kept",
            Some(false) => "MISSED",
            None => "NOT MEASURED",
        }
    }
}

/// The network row's own results, beside the migration figures the row
/// shares with the others.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkResult {
    /// Why the whole row did not run (no root, no netns tools, no KVM).
    pub skipped: Option<String>,
    /// Why QEMU's side did not run.
    pub qemu_skipped: Option<String>,
    pub ferry_runs: Vec<NetRun>,
    pub qemu_runs: Vec<NetRun>,
    pub ferry: Option<NetSummary>,
    pub qemu: Option<NetSummary>,
    /// Ferry / QEMU of the median longest TCP reply gap (below 1: Ferry's
    /// is shorter), and of the UDP one.
    pub ratio_tcp_gap: Option<f64>,
    pub ratio_udp_gap: Option<f64>,
    pub targets: Vec<TargetCheck>,
}

/// Why the row cannot run here, or None.
pub fn skip_reason() -> Option<String> {
    if let Some(why) = Topology::skip_reason() {
        return Some(why);
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    None
}

/// Runs the row `reps` times on each engine (QEMU's when `with_qemu`),
/// alternating them, into `out`: a failed run into its `ferry_errors` or
/// `qemu_errors`, the migration figures of the others into `ferry_runs`
/// and `qemu_runs`, and the client's figures into `network`.
pub fn run_row(
    out: &mut RowResult,
    workload: Workload,
    reps: usize,
    with_qemu: bool,
    elf: &Path,
    dir: &Path,
    on_run: &mut dyn FnMut(&str),
) {
    let row = out.row.clone();
    let mut result = NetworkResult {
        skipped: skip_reason(),
        qemu_skipped: None,
        ferry_runs: Vec::new(),
        qemu_runs: Vec::new(),
        ferry: None,
        qemu: None,
        ratio_tcp_gap: None,
        ratio_udp_gap: None,
        targets: Vec::new(),
    };
    if let Some(why) = &result.skipped {
        on_run(&format!("{} SKIPPED: {why}", row.name));
        result.targets = targets(&[], &[]);
        out.network = Some(result);
        return;
    }
    result.qemu_skipped = if !with_qemu {
        Some("QEMU not run (--no-qemu)".into())
    } else {
        qemu_binary().err().map(|e| e.to_string())
    };
    if let Some(why) = &result.qemu_skipped {
        on_run(&format!("{} qemu SKIPPED: {why}", row.name));
    }
    for rep in 1..=reps {
        on_run(&format!("{} ferry {rep}/{reps}", row.name));
        match on_topology(|topo, client| ferry_run(&row, workload, topo, dir, client)) {
            Ok((outcome, report)) => {
                result
                    .ferry_runs
                    .push(NetRun::new(rep, outcome.guest_stall_ms, report));
                out.ferry_runs.push(outcome);
            }
            Err(e) => out.ferry_errors.push(format!("{e:#}")),
        }
        if result.qemu_skipped.is_some() {
            continue;
        }
        on_run(&format!("{} qemu {rep}/{reps}", row.name));
        match on_topology(|topo, client| qemu_run(&row, workload, topo, elf, client)) {
            Ok((outcome, report)) => {
                result
                    .qemu_runs
                    .push(NetRun::new(rep, outcome.guest_stall_ms, report));
                out.qemu_runs.push(outcome);
            }
            Err(e) => out.qemu_errors.push(format!("{e:#}")),
        }
    }
    result.ferry = NetSummary::of(&result.ferry_runs);
    result.qemu = NetSummary::of(&result.qemu_runs);
    if let (Some(f), Some(q)) = (&result.ferry, &result.qemu) {
        let ratio = |a: f64, b: f64| (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b);
        result.ratio_tcp_gap = ratio(f.tcp_longest_gap_ms, q.tcp_longest_gap_ms);
        result.ratio_udp_gap = ratio(f.udp_longest_gap_ms, q.udp_longest_gap_ms);
    }
    result.targets = targets(&result.ferry_runs, &result.qemu_runs);
    out.network = Some(result);
}

/// The targets against the runs: 0 TCP resets and 0 UDP probes
/// lost across Ferry's migrations (and its connection kept), Ferry's
/// longest TCP gap at most its guest-seen stall + 2 ms, and both below
/// QEMU's (medians).
fn targets(ferry: &[NetRun], qemu: &[NetRun]) -> Vec<TargetCheck> {
    let f = NetSummary::of(ferry);
    let q = NetSummary::of(qemu);
    let fs = f.as_ref();
    let mut out = vec![
        TargetCheck {
            target: "Ferry: the TCP connection kept in every run".into(),
            kept: fs.map(|s| s.connections_kept == s.runs),
            measured: fs.map_or("-".into(), |s| {
                format!("{}/{} kept", s.connections_kept, s.runs)
            }),
        },
        TargetCheck {
            target: "Ferry: 0 TCP resets across its migrations".into(),
            kept: fs.map(|s| s.tcp_resets == 0),
            measured: fs.map_or("-".into(), |s| format!("{} resets", s.tcp_resets)),
        },
        TargetCheck {
            target: "Ferry: 0 UDP probes lost across its migrations".into(),
            kept: fs.map(|s| s.udp_probes_lost == 0),
            measured: fs.map_or("-".into(), |s| format!("{} lost", s.udp_probes_lost)),
        },
    ];
    let over: Vec<Option<f64>> = ferry.iter().map(NetRun::gap_over_stall_ms).collect();
    out.push(TargetCheck {
        target: format!(
            "Ferry: longest TCP gap <= guest-seen stall + {GAP_OVER_STALL_MS} ms in every run"
        ),
        kept: (!ferry.is_empty()).then(|| {
            over.iter()
                .all(|o| o.is_some_and(|d| d <= GAP_OVER_STALL_MS))
        }),
        measured: if ferry.is_empty() {
            "-".into()
        } else {
            ferry
                .iter()
                .map(|r| {
                    format!(
                        "gap {} vs stall {:.1} ms",
                        r.tcp_longest_gap_ms
                            .map_or("-".into(), |g| format!("{g:.1}")),
                        r.guest_stall_ms
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    });
    let below = |what: &str, a: Option<f64>, b: Option<f64>| TargetCheck {
        target: format!("Ferry's {what} below QEMU's (medians)"),
        kept: match (a, b) {
            (Some(a), Some(b)) if a.is_finite() && b.is_finite() => Some(a < b),
            _ => None,
        },
        measured: format!(
            "{} vs {} ms",
            a.filter(|x| x.is_finite())
                .map_or("-".into(), |x| format!("{x:.1}")),
            b.filter(|x| x.is_finite())
                .map_or("-".into(), |x| format!("{x:.1}"))
        ),
    };
    out.push(below(
        "longest TCP reply gap",
        f.as_ref().map(|s| s.tcp_longest_gap_ms),
        q.as_ref().map(|s| s.tcp_longest_gap_ms),
    ));
    out.push(below(
        "guest-seen stall",
        f.as_ref().map(|s| s.guest_stall_ms),
        q.as_ref().map(|s| s.guest_stall_ms),
    ));
    out
}

/// The client's probe, started when the guest is up and stopped a second
/// after it was verified on host B.
struct ClientProbe<'a> {
    topology: &'a Topology,
    probe: Option<Probe>,
    report: Option<ProbeReport>,
}

impl RunObserver for ClientProbe<'_> {
    fn guest_ready(&mut self) -> Result<(), String> {
        let probe = Probe::start_on(
            self.topology,
            PORT,
            ProbeConfig {
                max_duration: PROBE_LIMIT,
                ..ProbeConfig::default()
            },
        )
        .map_err(|e| format!("the client cannot reach the guest on host A: {e}"))?;
        self.probe = Some(probe);
        Ok(())
    }

    fn guest_moved(&mut self) {
        std::thread::sleep(AFTER_MOVE);
        if let Some(probe) = self.probe.take() {
            self.report = Some(probe.stop());
        }
    }
}

/// A fresh topology for one run (every run starts from the same network:
/// no learnt MAC, no ARP entry), removed afterwards whatever happened;
/// returns what `run` returned and the client's report.
fn on_topology<T>(
    run: impl FnOnce(&Topology, &mut ClientProbe) -> anyhow::Result<T>,
) -> anyhow::Result<(T, ProbeReport)> {
    let prefix = format!("fbn{}", std::process::id());
    let topology = Topology::up(&prefix).context("building the network row's topology")?;
    let mut client = ClientProbe {
        topology: &topology,
        probe: None,
        report: None,
    };
    let outcome = run(&topology, &mut client);
    // A run that failed half-way leaves its probe running: stop it.
    drop(client.probe.take());
    let report = client.report.take();
    let down = topology.down();
    let outcome = outcome?;
    down.context("removing the network row's topology")?;
    let report = report.ok_or_else(|| anyhow!("the client's probe never ran"))?;
    Ok((outcome, report))
}

/// The guest's echo on the topology's guest address.
fn echo(topo: &Topology) -> NetEcho {
    NetEcho {
        ip: topo.guest_ip(),
        prefix: topo.names().prefix_len,
        port: PORT,
    }
}

fn ferry_run(
    row: &Row,
    workload: Workload,
    topo: &Topology,
    dir: &Path,
    client: &mut ClientProbe,
) -> anyhow::Result<FerryOutcome> {
    let (a, b) = (topo.host(Host::A), topo.host(Host::B));
    let m = FerryMigration {
        mem_bytes: row.mem_bytes,
        workload,
        prealloc: row.prealloc,
        downtime: FERRY_DEFAULT_DOWNTIME,
        bandwidth: None,
        settle: Duration::from_secs(1),
        mode: Mode::Precopy,
        streams: None,
        priority: CpuPriority::Guest,
        vcpus: 1,
        tls: false,
        net: Some(FerryNet {
            echo: echo(topo),
            mac: MAC,
            source_ns: a.ns.clone(),
            source_tap: a.tap.clone(),
            destination_ns: b.ns.clone(),
            destination_tap: b.tap.clone(),
            destination_ip: b.ip,
        }),
        disk: None,
    };
    run_ferry_migration_observed(&m, dir, client)
}

fn qemu_run(
    row: &Row,
    workload: Workload,
    topo: &Topology,
    elf: &Path,
    client: &mut ClientProbe,
) -> anyhow::Result<QemuOutcome> {
    let (a, b) = (topo.host(Host::A), topo.host(Host::B));
    let guest = GuestWorkload {
        workload,
        net: Some(echo(topo)),
        disk: None,
    };
    let mut q = QemuMigration::new(
        elf,
        row.mem_bytes,
        ferry_testguest::guest_cmdline_with_net(&guest, 1, None),
    );
    q.prealloc = row.prealloc;
    q.network = Some(QemuNet {
        mac: MAC,
        source: QemuNic {
            ns: a.ns.clone(),
            tap: a.tap.clone(),
        },
        destination: QemuNic {
            ns: b.ns.clone(),
            tap: b.tap.clone(),
        },
        destination_ip: b.ip,
    });
    Ok(run_qemu_migration_observed(&q, client)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rep: usize, gap_ms: Option<f64>, stall_ms: f64, resets: u64, lost: u64) -> NetRun {
        NetRun {
            rep,
            connection_kept: resets == 0,
            tcp_requests_sent: 5000,
            tcp_requests_lost: 0,
            tcp_resets: resets,
            tcp_longest_gap_ms: gap_ms,
            tcp_retransmissions: 0,
            udp_probes_sent: 5000,
            udp_probes_lost: lost,
            udp_longest_gap_ms: gap_ms,
            guest_stall_ms: stall_ms,
            probe: ProbeReport {
                namespace: "c".into(),
                target: "10.77.1.2:7000".into(),
                interval_us: 1000,
                duration_ms: 5000.0,
                slots_skipped: 0,
                tcp: None,
                udp: None,
            },
        }
    }

    fn verdicts(t: &[TargetCheck]) -> Vec<Option<bool>> {
        t.iter().map(|c| c.kept).collect()
    }

    #[test]
    fn targets_kept_and_missed_are_told_apart() {
        let ferry = [run(1, Some(12.0), 11.0, 0, 0)];
        let qemu = [run(1, Some(300.0), 40.0, 0, 30)];
        assert_eq!(verdicts(&targets(&ferry, &qemu)), vec![Some(true); 6]);

        // A reset, a lost probe, a gap 3 ms over the stall, and a QEMU
        // that did better: every one of them is a miss.
        let ferry = [run(1, Some(14.0), 11.0, 1, 2)];
        let qemu = [run(1, Some(10.0), 5.0, 0, 0)];
        assert_eq!(verdicts(&targets(&ferry, &qemu)), vec![Some(false); 6]);
    }

    #[test]
    fn targets_without_runs_are_not_measured() {
        assert_eq!(verdicts(&targets(&[], &[])), vec![None; 6]);
        // Ferry alone: QEMU's comparisons stay unmeasured.
        let ferry = [run(1, Some(12.0), 11.0, 0, 0)];
        let v = verdicts(&targets(&ferry, &[]));
        assert_eq!(v[..4], [Some(true); 4]);
        assert_eq!(v[4..], [None, None]);
        // No reply at all: no gap, so the gap target is missed.
        let ferry = [run(1, None, 11.0, 0, 0)];
        assert_eq!(verdicts(&targets(&ferry, &[]))[3], Some(false));
    }

    #[test]
    fn the_summary_sums_losses_and_takes_medians_of_gaps() {
        let runs = [
            run(1, Some(10.0), 9.0, 0, 1),
            run(2, Some(30.0), 20.0, 2, 0),
            run(3, Some(20.0), 15.0, 0, 3),
        ];
        let s = NetSummary::of(&runs).unwrap();
        assert_eq!((s.runs, s.connections_kept), (3, 2));
        assert_eq!((s.tcp_resets, s.udp_probes_lost), (2, 4));
        assert_eq!(s.tcp_longest_gap_ms, 20.0);
        assert_eq!(s.guest_stall_ms, 15.0);
        assert!(NetSummary::of(&[]).is_none());
    }
}
