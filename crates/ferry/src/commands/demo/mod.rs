//! `ferry demo`: boots a VM on "host A", live-migrates it to "host B"
//! while it runs, and shows that the guest on B continued where it was and
//! verified every page of its working set afterwards.
//!
//! By default A and B are two `ferryd` agents (`agents`), with a CA made
//! for the demo, each in its own network namespace when run as root. With
//! `--direct`, A is this process and B a `ferry receive` child: the engine
//! alone, without agents (`direct`).

mod agents;
mod direct;
mod hosts;
mod log_tail;
mod network;
mod storage;

use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, DiskCounters, Heartbeat, Line};
use ferry_testguest::workload::Workload;

use crate::commands::run::VmArgs;

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
    /// Migrate between this process and a `ferry receive` child, without
    /// agents: the engine alone.
    #[arg(long)]
    pub direct: bool,
    /// `network`: the VM serves TCP and UDP on a virtio-net card in the
    /// test topology while a client probes it every 1 ms across the move
    /// (as root; engine to engine, like --direct). `storage`: the VM writes
    /// and checks a disk across the move (with --shared or --local).
    #[arg(value_enum)]
    pub scenario: Option<Scenario>,
    /// `storage`: both hosts open the same image, whose lock is handed
    /// over in the blackout.
    #[arg(long, conflicts_with = "local")]
    pub shared: bool,
    /// `storage`: the image is copied to host B's own while the VM runs
    /// (`--copy-storage`). The default.
    #[arg(long)]
    pub local: bool,
    /// Echo the guest console.
    #[arg(long)]
    pub verbose: bool,
    /// Print the demo's whole report as one JSON document on stdout (the
    /// running commentary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The VM's TCP connection and UDP echoes across the migration, on the
    /// test topology (network namespaces; needs root).
    Network,
    /// The VM's disk across the migration: on shared storage (--shared) or
    /// copied (--local).
    Storage,
}

/// The demo's whole report (`--json`).
#[derive(Debug, serde::Serialize)]
struct DemoReport {
    ok: bool,
    verdict: String,
    /// "two ferryd agents ..." or "direct ...": what A and B were.
    hosts: String,
    vcpus: u32,
    mem_bytes: u64,
    workload: String,
    source_ready_ms: Option<f64>,
    source_last_seq: Option<u64>,
    source_errors: u64,
    migration: Option<Box<ferry_migration::stats::MigrationReport>>,
    destination: Option<DestinationReport>,
    /// `ferry demo network`: what the client saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<network::NetworkOutcome>,
    /// `ferry demo storage`: what happened to the disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: Option<storage::StorageOutcome>,
}

impl DemoReport {
    fn new(args: &DemoArgs, hosts: String) -> Self {
        Self {
            ok: false,
            verdict: String::new(),
            hosts,
            vcpus: args.vm.vcpus(),
            mem_bytes: args.vm.mem,
            workload: args.vm.workload().to_string(),
            source_ready_ms: None,
            source_last_seq: None,
            source_errors: 0,
            migration: None,
            destination: None,
            network: None,
            storage: None,
        }
    }
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
pub(crate) use say;

/// The demo's workload unless flags say otherwise: 256 MiB rewritten at 1 GiB/s.
pub fn default_workload() -> Workload {
    "dirty:256:1024".parse().expect("a valid built-in workload")
}

/// `ferry demo storage`'s memory workload (the disk's is added): 64 MiB
/// rewritten at 64 MiB/s, on one vCPU, leaving a core to the disk's worker
/// and the copy.
fn storage_workload() -> Workload {
    "dirty:64:64".parse().expect("a valid built-in workload")
}

/// `ferry demo network`'s: 128 MiB rewritten at 256 MiB/s, on one vCPU.
fn network_workload() -> Workload {
    "dirty:128:256".parse().expect("a valid built-in workload")
}

pub fn demo(mut args: DemoArgs) -> anyhow::Result<bool> {
    // The storage demo gives the VM its own disk.
    args.vm.refuse_disk("ferry demo")?;
    // The network demo leaves a core to the card's worker, the client and
    // the migration: on a 2-core host, two vCPUs spinning on a 1 GiB/s
    // writer starved them (replies stalled for seconds after the move).
    let (workload, vcpus) = match args.scenario {
        Some(Scenario::Network) => (network_workload(), 1),
        Some(Scenario::Storage) => (storage_workload(), 1),
        None => (default_workload(), 2),
    };
    if (args.shared || args.local) && args.scenario != Some(Scenario::Storage) {
        anyhow::bail!("--shared and --local choose the disk of `ferry demo storage`");
    }
    args.vm
        .workload
        .get_or_insert(ferry_testguest::net::GuestWorkload {
            workload,
            net: None,
            disk: None,
        });
    args.vm.vcpus.get_or_insert(vcpus);
    match (&args.scenario, args.direct) {
        (Some(Scenario::Network), _) => {
            direct::run(&args, Some(network::NetworkScene::up()?), None)
        }
        (Some(Scenario::Storage), _) => {
            let kind = if args.shared {
                storage::StorageKind::Shared
            } else {
                storage::StorageKind::Local
            };
            direct::run(&args, None, Some(storage::StorageScene::up(kind)?))
        }
        (None, true) => direct::demo(&args),
        (None, false) => agents::demo(&args),
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

/// What host B's console showed after the switch.
struct DestinationVerdict {
    first: Heartbeat,
    last: Heartbeat,
    sweeps_on_b: u64,
    /// With a disk: its counters in B's first and last heartbeats.
    disk: Option<(DiskCounters, DiskCounters)>,
}

/// How long B has to run a whole sweep of the working set.
const DESTINATION_WINDOW: Duration = Duration::from_secs(20);

/// Reads host B's console lines (`next_line` waits at most the time it is
/// given; None when nothing came) until a full sweep ran entirely on B.
/// `why_silent` says what B reported when it stays silent. With
/// `disk_round`, B's guest must also read back and check that many blocks
/// of its disk, without an error.
fn verify_destination(
    mut next_line: impl FnMut(Duration) -> Option<String>,
    why_silent: impl Fn() -> String,
    last_src_seq: u64,
    disk_round: Option<u64>,
    verbose: bool,
    json: bool,
) -> Result<DestinationVerdict, String> {
    let deadline = Instant::now() + DESTINATION_WINDOW;
    let mut first: Option<Heartbeat> = None;
    let mut first_disk: Option<DiskCounters> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(line) = next_line(left) else {
            return Err(format!(
                "no full sweep verified on B within {} s; B said: {}",
                DESTINATION_WINDOW.as_secs(),
                why_silent()
            ));
        };
        if verbose {
            say!(json, "B: {line}");
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
                let disk = match disk_round {
                    None => None,
                    Some(_) => {
                        let d = DiskCounters::from_heartbeat(&line)
                            .ok_or("B's heartbeats carry no disk counters")?;
                        if d.disk_err > 0 {
                            return Err(format!(
                                "B's guest found {} bad blocks on its disk",
                                d.disk_err
                            ));
                        }
                        Some((*first_disk.get_or_insert(d), d))
                    }
                };
                let disk_done = match (disk_round, disk) {
                    (Some(round), Some((f, d))) => d.disk_ver >= f.disk_ver + round,
                    _ => true,
                };
                // +2: the sweep under way at the switchover ends on B, the
                // next one runs on B from its first page to its last.
                if hb.sweeps >= first.sweeps + 2 && disk_done {
                    return Ok(DestinationVerdict {
                        sweeps_on_b: hb.sweeps - first.sweeps - 1,
                        first: first.clone(),
                        last: hb,
                        disk,
                    });
                }
            }
            _ => {}
        }
    }
}

/// Prints the last lines of the demo and settles it on B's verdict (and,
/// for the network demo, on what the client saw).
fn conclude(
    mut doc: DemoReport,
    verdict: Result<DestinationVerdict, String>,
    last_src_seq: u64,
    source_errors: u64,
    scene_failure: Option<String>,
    json: bool,
) -> anyhow::Result<bool> {
    say!(json, "");
    say!(
        json,
        "  host A's last heartbeat     seq {last_src_seq} ({source_errors} verification errors on A)"
    );
    match verdict {
        Ok(v) => {
            say!(
                json,
                "  host B's first heartbeat    seq {} (stall the guest measured: {:.2} ms)",
                v.first.seq,
                v.first.stall_us as f64 / 1e3
            );
            say!(json,
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
            if let Some(why) = scene_failure {
                let part = if doc.storage.is_some() {
                    "disk"
                } else {
                    "network"
                };
                return finish(
                    doc,
                    false,
                    format!("Demo FAILED on the {part}: {why}"),
                    json,
                );
            }
            let ok = format!(
                "Demo OK: the VM moved from A to B while running; the guest continued at seq {} and verified its whole working set on B with 0 errors{}.",
                v.first.seq,
                if doc.network.is_some() {
                    "; its TCP connection was kept with no request lost and no UDP probe lost"
                } else if doc.storage.is_some() {
                    "; it read back a whole round of its disk on B and found every block as it last wrote it"
                } else {
                    ""
                }
            );
            finish(doc, true, ok, json)
        }
        Err(why) => finish(doc, false, format!("Demo FAILED on host B: {why}"), json),
    }
}
