//! `ferry migrate SOCKET --to ADDR`: live-migrates the VM served at SOCKET
//! (`ferry run --api SOCKET`) to a `ferry receive` at ADDR, with a live
//! progress bar, then prints the report.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use ferry_migration::stats::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::call_with_progress;
use crate::migration::priority::CpuPriority;
use crate::report::print_migration_report;
use ferry_control::{MigrateRequest, Request, Response, TransportRequest};

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM's API socket (`ferry run --api SOCKET`).
    pub socket: PathBuf,
    /// The destination, host:port of a `ferry receive --listen`.
    #[arg(long, required_unless_present = "resume")]
    pub to: Option<String>,
    /// Try again a post-copy that gave up after its link failed (the VM
    /// waits paused on the source); takes no other option.
    #[arg(long, conflicts_with_all = ["to", "mode", "bandwidth", "downtime"])]
    pub resume: bool,
    /// How long a post-copy whose link failed keeps reconnecting before it
    /// gives up and waits for --resume (default 30s).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub recovery_timeout: Option<Duration>,
    /// The blackout to aim for (e.g. 10ms).
    #[arg(long, default_value = "20ms", value_parser = crate::duration::parse_duration)]
    pub downtime: Duration,
    /// A hard limit on the blackout (like vSphere's stun-time limit): if
    /// the predicted blackout stays above it once the brake has done what
    /// it may, the migration is abandoned and the VM keeps running here.
    /// At least --downtime.
    #[arg(long, value_parser = crate::duration::parse_duration, conflicts_with = "resume")]
    pub max_downtime: Option<Duration>,
    /// Cap on the send rate, e.g. 200MiB/s or 2GiB/s; default: no cap.
    #[arg(long, value_parser = crate::size::parse_rate)]
    pub bandwidth: Option<u64>,
    /// Never throttle the guest, even when it outruns the link.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// precopy: rounds while the VM runs, then a short pause; postcopy:
    /// move the VM at once and fetch its memory after; hybrid: pre-copy,
    /// switching to post-copy when the rounds do not converge; auto:
    /// measure the guest and the link, predict each, take the best.
    #[arg(long, default_value = "auto")]
    pub mode: ferry_migration::mode::Mode,
    /// Let auto mode choose post-copy when it predicts it much faster.
    /// During a post-copy the VM runs on the destination while part of its
    /// memory is still here: a crash of either host loses the VM. Without this flag auto
    /// mode stays with pre-copy (and says what post-copy would have
    /// saved); `--mode postcopy` or `hybrid` asks for post-copy outright.
    #[arg(long, conflicts_with = "resume")]
    pub allow_postcopy: bool,
    /// TCP streams for the large pre-copy rounds, 1 to 8, or auto: one per
    /// core the VM's vCPUs leave free on this host, at most 4. More
    /// streams move memory faster when there are cores to drive them, and
    /// take CPU from the guest when there are not.
    #[arg(long, default_value = "auto", value_parser = parse_streams, conflicts_with = "resume")]
    pub streams: StreamsArg,
    /// Who gets a core when the migration and the guest compete for one:
    /// guest (the migration's threads yield) or migration (they share the
    /// vCPUs' cores: faster, and the guest loses scheduler slices).
    #[arg(long, value_enum, default_value = "guest", conflicts_with = "resume")]
    pub priority: CpuPriority,
    /// The migration's guaranteed share of the CPU, as the percentage of
    /// every 5 ms the vCPUs are parked while the rounds run, or auto: 50
    /// when the vCPUs take every core and --priority is guest, else 0.
    #[arg(long, default_value = "auto", value_parser = parse_cpu_share, conflicts_with = "resume")]
    pub cpu_share: CpuShareArg,
    /// Mutual TLS 1.3: this host's identity directory (ca.crt, cert.pem,
    /// key.pem, as `ferry ca issue` writes it). Needs --peer-name.
    #[arg(
        long,
        value_name = "DIR",
        requires = "peer_name",
        conflicts_with = "resume"
    )]
    pub tls: Option<PathBuf>,
    /// The destination's host name: its certificate must be for it, or the
    /// migration is refused before any page moves.
    #[arg(long, value_name = "HOST", requires = "tls", conflicts_with = "resume")]
    pub peer_name: Option<String>,
    /// Send the VM's memory and state in the clear, unauthenticated. The
    /// destination must be told the same.
    #[arg(long, conflicts_with_all = ["tls", "resume"])]
    pub insecure_plaintext: bool,
    /// A file (mode 0600) with the one-time session token the destination
    /// was prepared with (`ferry receive --token-file`): every connection
    /// of the migration opens with it (protocol v8).
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub token_file: Option<PathBuf>,
    /// Copy the VM's disk to the destination while the VM runs (a local
    /// disk, as QEMU's drive-mirror does): the whole image, then the
    /// blocks the guest writes behind the copy, round by round with the
    /// memory, the last ones in the blackout. The destination creates its
    /// image at its own --disk path. Pre-copy only (--mode precopy or
    /// auto): post-copy would leave blocks on this host. Without it, a
    /// disk must be on storage both hosts share.
    #[arg(long, conflicts_with = "resume")]
    pub copy_storage: bool,
    /// Print the report as one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `--cpu-share`: a percentage up to 90, or None for auto.
#[derive(Debug, Clone, Copy)]
pub struct CpuShareArg(pub Option<u32>);

fn parse_cpu_share(text: &str) -> Result<CpuShareArg, String> {
    if text == "auto" {
        return Ok(CpuShareArg(None));
    }
    match text.trim_end_matches('%').parse::<u32>() {
        Ok(n) if n <= 90 => Ok(CpuShareArg(Some(n))),
        _ => Err(format!(
            "`{text}` is not a share: give auto or a percentage from 0 to 90"
        )),
    }
}

impl MigrateArgs {
    pub fn request(&self) -> MigrateRequest {
        MigrateRequest {
            to: self.to.clone().unwrap_or_default(),
            downtime_ms: self.downtime.as_secs_f64() * 1e3,
            max_downtime_ms: self.max_downtime.map(|d| d.as_secs_f64() * 1e3),
            bandwidth: self.bandwidth,
            auto_converge: !self.no_auto_converge,
            mode: self.mode,
            allow_postcopy: self.allow_postcopy,
            recovery_ms: self
                .recovery_timeout
                .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
            streams: self.streams.0,
            priority: self.priority,
            cpu_share: self.cpu_share.0,
            transport: match (&self.tls, &self.peer_name) {
                (Some(dir), Some(peer_name)) => Some(TransportRequest::Tls {
                    // The VM's process may run in another directory.
                    dir: std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
                    peer_name: peer_name.clone(),
                }),
                _ if self.insecure_plaintext => Some(TransportRequest::InsecurePlaintext),
                _ => None,
            },
            token_file: self
                .token_file
                .as_ref()
                .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone())),
            copy_storage: self.copy_storage,
        }
    }
}

/// `--streams`: a count the protocol allows, or None for auto.
#[derive(Debug, Clone, Copy)]
pub struct StreamsArg(pub Option<u16>);

fn parse_streams(text: &str) -> Result<StreamsArg, String> {
    if text == "auto" {
        return Ok(StreamsArg(None));
    }
    let max = ferry_migration::precopy::stripes::MAX_STREAMS;
    match text.parse::<u16>() {
        Ok(n) if (1..=max).contains(&n) => Ok(StreamsArg(Some(n))),
        _ => Err(format!("expected auto or a number from 1 to {max}")),
    }
}

/// Shows progress: a bar on a terminal, a line per round otherwise.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    last_round: Option<(String, u32)>,
}

impl ProgressView {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            last_round: None,
        }
    }

    pub fn show(&mut self, p: &Progress) {
        if let Some(text) = &p.message {
            match &self.bar {
                Some(bar) => bar.println(format!("ferry: {text}")),
                None => eprintln!("ferry: {text}"),
            }
            return;
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let key = (p.phase.clone(), p.round);
        let new_round = self.last_round.as_ref() != Some(&key);
        self.last_round = Some(key);
        let summary = format!(
            "{:.1} MiB left, {:.0} MiB/s, dirty {:.0} MiB/s, throttle {}%, ETA {}",
            mib(p.remaining_bytes),
            p.throughput_mibs,
            p.dirty_rate_mibs,
            p.throttle_percent,
            p.eta_ms.map_or("-".into(), |e| format!("{e:.0} ms"))
        );
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(format!("{} {}", p.phase, p.round));
                bar.set_length(p.round_bytes.max(1));
                bar.set_position(p.round_bytes.saturating_sub(p.remaining_bytes));
                bar.set_message(summary);
            }
            None if new_round => eprintln!(
                "ferry: {} {}: {:.1} MiB to send, dirty {:.0} MiB/s, throttle {}%, {:.0} ms elapsed",
                p.phase,
                p.round,
                mib(p.round_bytes),
                p.dirty_rate_mibs,
                p.throttle_percent,
                p.elapsed_ms
            ),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<bool> {
    if let Some(max) = args.max_downtime {
        if max < args.downtime {
            bail!(
                "--max-downtime {max:?} is below --downtime {:?}: the limit must allow the target",
                args.downtime
            );
        }
    }
    if !args.resume && args.tls.is_none() && !args.insecure_plaintext {
        bail!(
            "refusing to migrate in the clear: give --tls DIR --peer-name HOST (mutual TLS 1.3), or --insecure-plaintext on both sides to send the VM's memory unencrypted and unauthenticated"
        );
    }
    let mut view = ProgressView::new();
    let request = if args.resume {
        Request::ResumeMigration
    } else {
        Request::Migrate(args.request())
    };
    let answer = call_with_progress(&args.socket, &request, |r| {
        if let Response::Progress(p) = r {
            view.show(p);
        }
    });
    view.finish();
    match answer? {
        Response::Migrated(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_migration_report(&report);
            }
            Ok(true)
        }
        Response::MigrationFailed {
            reason,
            vm_running,
            resumable,
            report,
        } => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            let place = if vm_running {
                "the VM is running on the source"
            } else if resumable {
                "the VM is PAUSED on the source, which keeps its pages; `ferry migrate SOCKET --resume` tries again"
            } else {
                "the VM is PAUSED on the source and must not be resumed until it is known whether the destination runs it"
            };
            eprintln!("ferry: migration failed: {reason}; {place}");
            Ok(false)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the VM: {other:?}"),
    }
}
