//! The source side of a pre-copy migration: handshake and reservation,
//! a full first pass, rounds of dirty pages until the predicted blackout
//! fits the target (braking a guest that outruns the link), then the
//! blackout and the commit. Before the commit any failure resumes the VM
//! here; after it the VM is the destination's.

use crate::transport::Link;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::bandwidth::Pacer;
use crate::bitmap::{push_run, PageBitmap};
use crate::guest::SourceGuest;
use crate::handover::{ForwardLimits, Forwarder};
use crate::mode::Mode;
use crate::policy::{Decision, Policy, PolicyConfig, RoundFacts};
use crate::postcopy::channel::{new_session, open_fault_channel};
use crate::postcopy::source::{serve, ServeEvent, ServeOptions, Unfinished};
use crate::precopy::decision;
use crate::precopy::error::{error_chain, MigrateError};
use crate::precopy::parallel_send::{open_streams, send_striped, Streams};
use crate::precopy::send::{PageSender, SentCounts};
use crate::protocol::{
    read_header, read_message, recv_message, write_message, write_state, Abort, Commit, Hello,
    HelloAck, Message, PageRun, PayloadCheck, PostcopyBegin, Prepare, RamRange, Role, RoundEnd,
    StripedRound, COMMIT_RECOVERY_VERSION, NET_HANDOVER_VERSION, PAGE_SIZE, POSTCOPY_VERSION,
    STORAGE_COPY_VERSION, STORAGE_VERSION, STREAMS_VERSION,
};
use crate::stats::{mib_per_s, GuestSeen, MigrationReport, Progress, RoundReport};

mod auto_start;
mod blackout;
mod disk_hold;
mod peer;
mod rounds;
mod to_postcopy;

use auto_start::*;
use blackout::*;
use disk_hold::*;
use peer::*;
use rounds::*;
pub use to_postcopy::resume_postcopy;
use to_postcopy::*;

/// How often the progress callback hears from a running migration.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Below this many bytes a round's send rate says more about latency than
/// about the link, and is not used to predict the blackout.
const RATE_SAMPLE_MIN: u64 = 4 << 20;
/// The rate assumed until one has been measured: loopback-class links do
/// several times better, so this only errs towards one more round.
const ASSUMED_RATE: f64 = 1e9;
/// Progress timeline resolution.
const TIMELINE_EVERY_MS: f64 = 10.0;

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub mode: Mode,
    pub policy: PolicyConfig,
    /// `--bandwidth`, bytes per second.
    pub bandwidth: Option<u64>,
    /// Longest wait for any read or write on the stream.
    pub io_timeout: Duration,
    /// How long to wait, after the commit, for the destination's report of
    /// what the guest saw.
    pub guest_report_wait: Duration,
    /// How long a post-copy whose link failed, or a commit whose answer
    /// was lost, keeps trying to reach the destination again (the VM stays
    /// paused here meanwhile).
    pub link_recovery: Duration,
    /// Page-data streams for large pre-copy rounds; 1 keeps every page on
    /// the main connection.
    pub streams: u16,
    /// The migration's guaranteed share of the host's CPU, for a host
    /// whose vCPUs leave no core free: while the rounds run, the vCPUs are
    /// parked at least this percentage of every brake period, and the
    /// migration's threads run on the cores they leave (0: no floor).
    pub cpu_share: u32,
    /// An operator's cancel: checked between rounds, it ends the migration
    /// the way any failure before the commit does (the VM runs on here).
    /// The engine seals it when its blackout or its switch to post-copy
    /// begins; a cancel that came first makes the engine abort there
    /// instead, and a later one is refused.
    pub cancel: Option<std::sync::Arc<crate::cancel::CancelState>>,
    /// Set by an operator while the migration runs: the pre-copy pacers
    /// follow its bandwidth cap from their next batch, and the round loop
    /// takes its downtime target or switch to post-copy between rounds.
    /// None: the options above hold to the end.
    pub tuning: Option<std::sync::Arc<crate::tuning::Tuning>>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            policy: PolicyConfig::default(),
            bandwidth: None,
            io_timeout: Duration::from_secs(30),
            guest_report_wait: Duration::from_secs(2),
            link_recovery: Duration::from_secs(30),
            streams: 1,
            cpu_share: 0,
            cancel: None,
            tuning: None,
        }
    }
}

/// A migration that did not complete.
#[derive(Debug)]
pub struct Failure {
    pub error: MigrateError,
    /// A post-copy whose link failed for good: the VM runs on the
    /// destination, waiting for pages only this host holds; `resume` with
    /// this tries again.
    pub resume: Option<Box<Unfinished>>,
    /// True when the VM runs on the source again (always, unless the
    /// commit was sent and its acknowledgment never came).
    pub vm_running: bool,
    pub report: Box<MigrationReport>,
}

impl Failure {
    pub fn reason(&self) -> String {
        error_chain(&self.error)
    }
}

/// How to reach the destination again about the commit decision.
#[derive(Debug, Clone)]
struct CommitRecovery {
    addr: std::net::SocketAddr,
    dialer: crate::transport::Dialer,
    session: u64,
    window: Duration,
    io_timeout: Duration,
}

/// Live state of one migration, shared by its steps.
struct Run<'p> {
    t0: Instant,
    report: MigrationReport,
    progress: &'p mut dyn FnMut(&Progress),
    last_progress: Instant,
    paused: bool,
    throttle: u32,
    commit_sent: bool,
    /// (window, io timeout) when the destination speaks v4, whose commit
    /// decision can be repeated on a new connection.
    recoverable_commit: Option<(Duration, Duration)>,
    /// Set once the destination may wait for our decision: what to name
    /// when coming back to repeat or withdraw it.
    commit_recovery: Option<CommitRecovery>,
    postcopy_started: bool,
    /// The VM's disks travel with it (their blocks as pages of the disk
    /// range): pre-copy only, since post-copy would leave blocks behind
    /// on a host whose crash would lose them.
    copies_disks: bool,
    /// The copied disk switched to write-blocking (until the pause).
    disk_writes_held: bool,
    /// The copied disk's dirty bytes at the last harvest.
    last_disk_dirty: Option<u64>,
    /// A post-copy given up on, which can be resumed.
    unfinished: Option<Box<Unfinished>>,
    rate: Option<f64>,
    /// The operator's bandwidth cap as of the last round.
    send_cap: Option<u64>,
    last_dirty_rate: f64,
    ram_ranges: Vec<RamRange>,
    /// The protocol version agreed on.
    version: u16,
    /// Hello to HelloAck: the link's round trip.
    round_trip: Duration,
    /// How long the last live harvest of the dirty log took.
    last_harvest_cost: Duration,
    /// The blackout's instants, once it happened; the downtime is added up
    /// from them when the destination reports its share.
    clock: Option<BlackoutClock>,
    expected_pages_ms: f64,
}

impl Run<'_> {
    fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    /// The rate the link sends at, for predictions: the measured one, or
    /// the operator's cap when that is lower (small rounds measure no
    /// rate, and the rate assumed then is far above any cap).
    fn link_rate(&self) -> f64 {
        let measured = self.rate.unwrap_or(ASSUMED_RATE);
        self.send_cap.map_or(measured, |c| measured.min(c as f64))
    }

    fn tell(
        &mut self,
        phase: &str,
        round: u32,
        round_bytes: u64,
        round_sent: u64,
        round_start: Instant,
        force: bool,
    ) {
        let now = Instant::now();
        if !force && now.duration_since(self.last_progress) < PROGRESS_EVERY {
            return;
        }
        self.last_progress = now;
        let round_ms = now.duration_since(round_start).as_secs_f64() * 1e3;
        let throughput = mib_per_s(round_sent, round_ms);
        let remaining = round_bytes.saturating_sub(round_sent);
        let progress = Progress {
            phase: phase.into(),
            round,
            remaining_bytes: remaining,
            round_bytes,
            sent_bytes: self.report.bytes_sent + round_sent,
            dirty_rate_mibs: self.last_dirty_rate,
            throughput_mibs: throughput,
            throttle_percent: self.throttle,
            elapsed_ms: self.ms(),
            eta_ms: (throughput > 0.0)
                .then(|| remaining as f64 / (1 << 20) as f64 / throughput * 1e3),
            message: None,
        };
        (self.progress)(&progress);
    }

    /// Tells the operator something once, through the progress stream.
    fn say(&mut self, text: String) {
        let progress = Progress {
            phase: "note".into(),
            elapsed_ms: self.ms(),
            message: Some(text),
            ..Default::default()
        };
        (self.progress)(&progress);
    }
}

/// Migrates `guest` over `stream` (connected to a `ferry receive`).
/// On success the VM belongs to the destination: the caller must stop it
/// here and never run it again.
pub fn migrate<G: SourceGuest + ?Sized>(
    guest: &mut G,
    mut stream: Link,
    destination: &str,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    let mut run = Run {
        t0: Instant::now(),
        report: MigrationReport {
            mode: options.mode.name().into(),
            outcome: "running".into(),
            destination: destination.into(),
            transport: stream.describe(),
            downtime_target_ms: options.policy.downtime_target.as_secs_f64() * 1e3,
            bandwidth_limit: options.bandwidth,
            ..Default::default()
        },
        progress,
        last_progress: Instant::now(),
        paused: false,
        throttle: 0,
        commit_sent: false,
        recoverable_commit: None,
        commit_recovery: None,
        postcopy_started: false,
        copies_disks: false,
        disk_writes_held: false,
        last_disk_dirty: None,
        unfinished: None,
        rate: None,
        send_cap: options.bandwidth,
        last_dirty_rate: 0.0,
        ram_ranges: Vec::new(),
        version: 0,
        round_trip: Duration::ZERO,
        last_harvest_cost: Duration::ZERO,
        clock: None,
        expected_pages_ms: 0.0,
    };
    match drive(guest, &mut stream, options, &mut run) {
        Ok(()) => {
            run.report.outcome = "committed".into();
            // A post-copy forwarded its frames while it served the pages.
            if run.version >= NET_HANDOVER_VERSION && !run.postcopy_started {
                if let Some(mut net) = guest.network_after_commit() {
                    let limits = ForwardLimits::default();
                    run.report.network = Some(crate::handover::forward_after_commit(
                        &mut stream,
                        net.as_mut(),
                        &limits,
                    ));
                }
            }
            let (guest_seen, started) = wait_guest_report(&mut stream, options.guest_report_wait);
            run.report.guest = guest_seen;
            if let Some(clock) = &run.clock {
                clock.fill(&mut run.report.blackout, started.as_ref());
            }
            if run.clock.is_some() || run.postcopy_started {
                let target = run.report.downtime_target_ms;
                run.report.blackout.judge(target, run.expected_pages_ms);
            }
            let rounds = run.report.rounds.len() as u32;
            run.tell("committed", rounds, 0, 0, Instant::now(), true);
            Ok(run.report)
        }
        Err(error) => {
            let error = peer_reason(&mut stream, error);
            let mut resume_failed = None;
            let vm_running = if run.commit_sent {
                false
            } else {
                let reason = error_chain(&error);
                // Best effort: the destination may be gone already.
                let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = write_message(&mut stream, &Message::Abort(Abort { reason }));
                if let Some(r) = &run.commit_recovery {
                    // The Abort above may not get through the link that failed.
                    decision::announce_abort(&r.dialer, r.addr, r.session);
                }
                let _ = guest.set_throttle(0);
                let _ = guest.set_dirty_logging(false);
                if run.paused {
                    match guest.resume() {
                        Ok(()) => true,
                        Err(e) => {
                            run.say(format!("the VM cannot resume here: {e}"));
                            resume_failed = Some(e.to_string());
                            false
                        }
                    }
                } else {
                    true
                }
            };
            run.report.outcome = if vm_running {
                "aborted: VM running on the source".into()
            } else if let Some(why) = resume_failed {
                format!("aborted: VM paused on the source, it cannot resume ({why})")
            } else if run.postcopy_started {
                "post-copy interrupted: the VM waits on the destination for pages held here".into()
            } else {
                "commit unacknowledged: VM paused".into()
            };
            run.report.total_ms = run.ms();
            Err(Failure {
                error,
                vm_running,
                resume: run.unfinished.take(),
                report: Box::new(run.report),
            })
        }
    }
}

fn drive<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
    options: &MigrateOptions,
    run: &mut Run<'_>,
) -> Result<(), MigrateError> {
    let stage = "setting up the connection";
    stream
        .set_nodelay(true)
        .map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
    stream
        .set_read_timeout(Some(options.io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(options.io_timeout)))
        .map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
    run.tell("setup", 0, 0, 0, Instant::now(), true);
    let version = handshake(guest, stream, run)?;
    run.version = version;
    run.report.setup_ms = run.ms();
    run.recoverable_commit =
        (version >= COMMIT_RECOVERY_VERSION).then_some((options.link_recovery, options.io_timeout));
    if run.copies_disks && matches!(options.mode, Mode::Postcopy | Mode::Hybrid) {
        return Err(MigrateError::NotPossible(format!(
            "--mode {} cannot move a VM whose disk is copied: the blocks not yet sent would stay on this host while the VM runs there; use --mode precopy or auto",
            options.mode.name()
        )));
    }
    if options.mode.may_postcopy() && version < POSTCOPY_VERSION {
        return Err(MigrateError::Refused(format!(
            "the destination speaks protocol v{version}, which has no post-copy (v{POSTCOPY_VERSION} and later); use --mode precopy"
        )));
    }
    let streams = open_streams_if_asked(guest, stream, options, version, run)?;
    let tuning = options
        .tuning
        .clone()
        .unwrap_or_else(|| std::sync::Arc::new(crate::tuning::Tuning::new(options.bandwidth)));
    let mut sender = PageSender::new(Pacer::following(tuning.clone(), 1))
        .with_check(PayloadCheck::for_link(stream.is_tls(), version));
    let (mode, start) = match options.mode {
        Mode::Auto => {
            let start = choose_mode(guest, stream, &mut sender, options, run)?;
            (start.mode, Some(start))
        }
        chosen => (chosen, None),
    };
    if mode == Mode::Postcopy {
        let reason = if options.mode == Mode::Auto {
            "auto mode chose it"
        } else {
            "post-copy was asked for"
        };
        let needed = start.map(|s| s.unsent);
        return switch_to_postcopy(guest, stream, options, run, needed, Duration::ZERO, reason);
    }

    let mut config = options.policy.clone();
    config.postcopy_fallback = mode == Mode::Hybrid;
    let mut policy = Policy::new(config);
    let first_round = Instant::now();
    let mut scratch = Vec::new();
    guest
        .set_dirty_logging(true)
        .map_err(MigrateError::guest("starting dirty logging"))?;
    let share = options.cpu_share;
    if share > 0 {
        guest.set_throttle(share).map_err(MigrateError::guest(
            "parking the vCPUs for the migration's share",
        ))?;
        run.throttle = share;
    }
    let (mut runs, mut round, mut last_harvest) = match start {
        // Auto sent the first pages already, to measure the link.
        Some(s) => (s.unsent.runs(), 2u32, s.harvested),
        None => {
            let populated = guest
                .populated()
                .map_err(MigrateError::guest("finding the populated memory"))?;
            (ranges_to_runs(&populated), 1u32, Instant::now())
        }
    };
    let (dirty, predicted, forced) = loop {
        let (sent, seen) = if mode == Mode::Hybrid {
            match send_round_watching(guest, stream, &mut sender, run, round, &runs, last_harvest)?
            {
                Watched::Sent(sent, seen) => (sent, Some(seen)),
                Watched::Outrun { needed, reason } => {
                    return switch_to_postcopy(
                        guest,
                        stream,
                        options,
                        run,
                        Some(needed),
                        Duration::ZERO,
                        &reason,
                    );
                }
            }
        } else {
            let striped = streams.as_ref().filter(|_| {
                runs.iter().map(PageRun::bytes).sum::<u64>() >= STRIPED_ROUND_MIN_BYTES
            });
            let sent = match striped {
                Some(streams) => send_round_striped(streams, stream, run, round, &runs, &tuning)?,
                None => send_round(guest, stream, &mut sender, run, round, &runs, false)?,
            };
            (sent, None)
        };
        guest.round_sent();
        poll_abort(stream, &mut scratch)?;
        if options.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(target) = tuning.take_downtime() {
            policy.set_downtime_target(target);
        }
        let mut operator_postcopy = tuning.take_postcopy() && version >= POSTCOPY_VERSION;
        if operator_postcopy && run.copies_disks {
            run.say("post-copy asked for, refused: the VM's disk is being copied, which only pre-copy does safely".into());
            operator_postcopy = false;
        }
        let round_ms = run
            .report
            .rounds
            .last()
            .expect("send_round adds the round")
            .duration_ms;
        if sent.bytes >= RATE_SAMPLE_MIN {
            run.rate = Some(sent.bytes as f64 / (round_ms / 1e3).max(1e-6));
        }
        let harvest_cpu = crate::cpu_clock::thread_cpu_time();
        let mut dirty = guest
            .harvest_dirty()
            .map_err(MigrateError::guest("harvesting dirty pages"))?;
        run.last_harvest_cost = crate::cpu_clock::thread_cpu_time().saturating_sub(harvest_cpu);
        if let Some(rtt) = crate::cpu_clock::tcp_round_trip(stream.tcp()) {
            run.round_trip = rtt;
        }
        run.send_cap = tuning.bandwidth();
        let rate = run.link_rate();
        policy.set_fixed_blackout(crate::policy::fixed_costs(
            run.last_harvest_cost,
            run.round_trip,
            rate,
            run.report.vcpus,
        ));
        if let Some(seen) = &seen {
            dirty.union_with(seen);
        }
        let elapsed = last_harvest.elapsed();
        last_harvest = Instant::now();
        run.last_dirty_rate = mib_per_s(dirty.bytes(), elapsed.as_secs_f64() * 1e3);
        if let Some(r) = run.report.rounds.last_mut() {
            r.dirty_rate_mibs = run.last_dirty_rate;
        }
        let target = policy.config().downtime_target;
        hold_disk_if_outrun(guest, run, &dirty, elapsed, target)?;
        let facts = RoundFacts {
            round,
            dirty_bytes: dirty.bytes(),
            elapsed,
            send_rate: rate,
            since_start: first_round.elapsed(),
        };
        if operator_postcopy {
            return switch_to_postcopy(
                guest,
                stream,
                options,
                run,
                Some(dirty),
                Duration::ZERO,
                "the operator asked for post-copy",
            );
        }
        match policy.decide(facts) {
            Decision::Switchover { predicted, forced } => break (dirty, predicted, forced),
            Decision::GiveUp { predicted } => {
                return Err(MigrateError::DowntimeLimit(format!(
                    "after {round} rounds with the brake at {}% the blackout would still take about {:.1} ms ({:.1} MiB left at {:.0} MiB/s), over --max-downtime {:.1} ms",
                    run.throttle,
                    predicted.as_secs_f64() * 1e3,
                    dirty.bytes() as f64 / (1 << 20) as f64,
                    rate / (1 << 20) as f64,
                    policy.config().max_downtime.unwrap_or_default().as_secs_f64() * 1e3
                )));
            }
            Decision::StartPostcopy { predicted, reason } => {
                return switch_to_postcopy(
                    guest,
                    stream,
                    options,
                    run,
                    Some(dirty),
                    predicted,
                    reason,
                );
            }
            Decision::NextRound { throttle, .. } => {
                let throttle = throttle.max(share);
                if throttle != run.throttle {
                    guest
                        .set_throttle(throttle)
                        .map_err(MigrateError::guest("throttling the guest"))?;
                    run.throttle = throttle;
                    run.report.max_throttle_percent = run.report.max_throttle_percent.max(throttle);
                }
                runs = dirty.runs();
                round += 1;
            }
        }
    };
    let fixed = policy.config().fixed_blackout;
    let expected = Expected {
        total: predicted,
        pages: predicted.saturating_sub(fixed),
        forced,
    };
    let limit = policy.config().max_downtime;
    seal(options, crate::cancel::Sealed::Blackout)?;
    blackout(
        guest,
        stream,
        &mut sender,
        run,
        round + 1,
        dirty,
        expected,
        limit,
    )
}

/// Passes the point of no return, unless an operator's cancel came first.
fn seal(options: &MigrateOptions, at: crate::cancel::Sealed) -> Result<(), MigrateError> {
    match &options.cancel {
        Some(cancel) => cancel.seal(at).map_err(|_| MigrateError::Cancelled),
        None => Ok(()),
    }
}

pub(super) fn ranges_to_runs(ranges: &[RamRange]) -> Vec<PageRun> {
    let mut out = Vec::new();
    for r in ranges {
        push_run(&mut out, r.gpa, r.len / PAGE_SIZE as u64);
    }
    out
}
