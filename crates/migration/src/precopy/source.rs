//! The source side of a pre-copy migration: handshake and reservation,
//! a full first pass, rounds of dirty pages until the predicted blackout
//! fits the target (braking a guest that outruns the link), then the
//! blackout and the commit. Before the commit any failure resumes the VM
//! here; after it the VM is the destination's.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::bandwidth::Pacer;
use crate::bitmap::{push_run, PageBitmap};
use crate::guest::SourceGuest;
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
    HelloAck, Message, PageRun, PostcopyBegin, Prepare, RamRange, Role, RoundEnd, StripedRound,
    COMMIT_RECOVERY_VERSION, PAGE_SIZE, POSTCOPY_VERSION, STREAMS_VERSION,
};
use crate::stats::{mib_per_s, GuestSeen, MigrationReport, Progress, RoundReport};

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
pub struct PrecopyOptions {
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
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            policy: PolicyConfig::default(),
            bandwidth: None,
            io_timeout: Duration::from_secs(30),
            guest_report_wait: Duration::from_secs(2),
            link_recovery: Duration::from_secs(30),
            streams: 1,
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
#[derive(Debug, Clone, Copy)]
struct CommitRecovery {
    addr: std::net::SocketAddr,
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
    /// A post-copy given up on, which can be resumed.
    unfinished: Option<Box<Unfinished>>,
    rate: Option<f64>,
    last_dirty_rate: f64,
    ram_ranges: Vec<RamRange>,
}

impl Run<'_> {
    fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
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
    mut stream: TcpStream,
    destination: &str,
    options: &PrecopyOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    let mut run = Run {
        t0: Instant::now(),
        report: MigrationReport {
            mode: options.mode.name().into(),
            outcome: "running".into(),
            destination: destination.into(),
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
        unfinished: None,
        rate: None,
        last_dirty_rate: 0.0,
        ram_ranges: Vec::new(),
    };
    match drive(guest, &mut stream, options, &mut run) {
        Ok(()) => {
            run.report.outcome = "committed".into();
            run.report.guest = wait_guest_report(&mut stream, options.guest_report_wait);
            let rounds = run.report.rounds.len() as u32;
            run.tell("committed", rounds, 0, 0, Instant::now(), true);
            Ok(run.report)
        }
        Err(error) => {
            let error = peer_reason(&mut stream, error);
            let vm_running = if run.commit_sent {
                false
            } else {
                let reason = error_chain(&error);
                // Best effort: the destination may be gone already.
                let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = write_message(&mut stream, &Message::Abort(Abort { reason }));
                if let Some(r) = run.commit_recovery {
                    // The Abort above may not get through the link that failed.
                    decision::announce_abort(r.addr, r.session);
                }
                let _ = guest.set_throttle(0);
                let _ = guest.set_dirty_logging(false);
                if run.paused {
                    guest.resume().is_ok()
                } else {
                    true
                }
            };
            run.report.outcome = if vm_running {
                "aborted: VM running on the source".into()
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
    stream: &mut TcpStream,
    options: &PrecopyOptions,
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
    run.report.setup_ms = run.ms();
    run.recoverable_commit =
        (version >= COMMIT_RECOVERY_VERSION).then_some((options.link_recovery, options.io_timeout));
    if options.mode.may_postcopy() && version < POSTCOPY_VERSION {
        return Err(MigrateError::Refused(format!(
            "the destination speaks protocol v{version}, which has no post-copy (v{POSTCOPY_VERSION} and later); use --mode precopy"
        )));
    }
    let streams = open_streams_if_asked(guest, stream, options, version, run)?;
    let mut sender = PageSender::new(Pacer::new(options.bandwidth));
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
                Some(streams) => {
                    send_round_striped(streams, stream, run, round, &runs, options.bandwidth)?
                }
                None => send_round(guest, stream, &mut sender, run, round, &runs, false)?,
            };
            (sent, None)
        };
        poll_abort(stream, &mut scratch)?;
        let round_report = run
            .report
            .rounds
            .last_mut()
            .expect("send_round adds the round");
        if sent.bytes >= RATE_SAMPLE_MIN {
            run.rate = Some(sent.bytes as f64 / (round_report.duration_ms / 1e3).max(1e-6));
        }
        let mut dirty = guest
            .harvest_dirty()
            .map_err(MigrateError::guest("harvesting dirty pages"))?;
        if let Some(seen) = &seen {
            dirty.union_with(seen);
        }
        let elapsed = last_harvest.elapsed();
        last_harvest = Instant::now();
        run.last_dirty_rate = mib_per_s(dirty.bytes(), elapsed.as_secs_f64() * 1e3);
        round_report.dirty_rate_mibs = run.last_dirty_rate;
        let facts = RoundFacts {
            round,
            dirty_bytes: dirty.bytes(),
            elapsed,
            send_rate: run.rate.unwrap_or(ASSUMED_RATE),
            since_start: first_round.elapsed(),
        };
        match policy.decide(facts) {
            Decision::Switchover { predicted, forced } => break (dirty, predicted, forced),
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
    blackout(
        guest,
        stream,
        &mut sender,
        run,
        round + 1,
        dirty,
        predicted,
        forced,
    )
}

/// Tries again a post-copy given up on (`Failure::resume`): reconnects to
/// the destination, learns which pages it holds, sends the rest. On
/// failure the `Failure` carries the same post-copy, to try again later.
pub fn resume_postcopy(
    unfinished: Box<Unfinished>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    let t0 = Instant::now();
    let needed = unfinished.needed_pages();
    let mut report = MigrationReport {
        mode: "postcopy (resumed)".into(),
        destination: unfinished.destination().to_string(),
        ..Default::default()
    };
    let mut events = |event: ServeEvent| {
        let p = match event {
            ServeEvent::Progress(sent, total) => Progress {
                phase: "postcopy".into(),
                round_bytes: total * PAGE_SIZE as u64,
                remaining_bytes: total.saturating_sub(sent) * PAGE_SIZE as u64,
                elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            },
            ServeEvent::Note(text) => Progress {
                phase: "note".into(),
                message: Some(text),
                elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            },
        };
        progress(&p);
    };
    match crate::postcopy::source::resume(unfinished, &mut events) {
        Ok(mut served) => {
            report.outcome = "committed".into();
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            report.bytes_sent = served.bytes;
            report.pages_sent = served.pushed_pages + served.requested_pages;
            report.throughput_mibs = mib_per_s(served.bytes, report.total_ms);
            // The link that failed before the operator's word counts too.
            served.recoveries += 1;
            report.postcopy =
                Some(served.report("resumed by the operator", needed, report.total_ms));
            Ok(report)
        }
        Err((error, unfinished)) => {
            report.outcome =
                "post-copy interrupted: the VM waits on the destination for pages held here".into();
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            Err(Failure {
                error,
                vm_running: false,
                resume: Some(unfinished),
                report: Box::new(report),
            })
        }
    }
}

/// How long auto mode watches the guest's writes before it chooses: a
/// first look, and the whole sample for a guest that is not quiet.
const AUTO_QUICK_SAMPLE: Duration = Duration::from_millis(20);
const AUTO_SAMPLE: Duration = Duration::from_millis(100);
/// Auto mode measures the link with the first pages of the first pass.
const PROBE_PAGES: u64 = 4096;
/// Below this, a probe says more about latency than about the link.
const PROBE_MIN_BYTES: u64 = 4 << 20;

/// What auto mode decided, and where the migration goes on from.
struct AutoStart {
    mode: Mode,
    /// Pages the destination does not hold current: the rest of the first
    /// pass, and what the guest dirtied since the probe began.
    unsent: PageBitmap,
    /// When the dirty log was last harvested.
    harvested: Instant,
}

/// Auto mode: sends the start of the first pass to measure the link (the
/// cap holds there too), samples the guest's dirty rate meanwhile,
/// predicts each mode and picks one; says so, and keeps the prediction for
/// the report. Nothing is wasted: those pages are the first pass's.
fn choose_mode<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    sender: &mut PageSender,
    options: &PrecopyOptions,
    run: &mut Run<'_>,
) -> Result<AutoStart, MigrateError> {
    let stage = "sampling the guest and the link";
    guest
        .set_dirty_logging(true)
        .map_err(MigrateError::guest(stage))?;
    // Logging may start with every page marked: clear that first.
    guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
    let t = Instant::now();
    let populated = guest.populated().map_err(MigrateError::guest(stage))?;
    let populated_bytes: u64 = populated.iter().map(|r| r.len).sum();
    let mut slices = split_runs(&ranges_to_runs(&populated), PROBE_PAGES).into_iter();
    let probe = slices.next().unwrap_or_default();
    let t_probe = Instant::now();
    let sent = send_round(guest, stream, sender, run, 1, &probe, false)?;
    let probe_time = t_probe.elapsed();
    let (link_rate, link_rate_measured) = if sent.bytes >= PROBE_MIN_BYTES {
        (sent.bytes as f64 / probe_time.as_secs_f64().max(1e-6), true)
    } else {
        (options.bandwidth.map_or(ASSUMED_RATE, |b| b as f64), false)
    };
    // A short look settles a quiet guest; a busy one is watched longer,
    // for a steadier rate.
    std::thread::sleep(AUTO_QUICK_SAMPLE.saturating_sub(t.elapsed()));
    let mut dirty = guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
    let quiet = (dirty.bytes() as f64 / t.elapsed().as_secs_f64().max(1e-6)) < 0.05 * link_rate;
    if !quiet {
        std::thread::sleep(AUTO_SAMPLE.saturating_sub(t.elapsed()));
        let more = guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
        dirty.union_with(&more);
    }
    let harvested = Instant::now();
    let sample = t.elapsed();
    let facts = crate::auto::AutoFacts {
        populated_bytes,
        dirty_rate: dirty.bytes() as f64 / sample.as_secs_f64().max(1e-6),
        link_rate,
        link_rate_measured,
        sample,
        downtime_target: options.policy.downtime_target,
        fixed_blackout: options.policy.fixed_blackout,
    };
    let (mode, prediction) = crate::auto::choose(&facts);
    let modes: Vec<String> = prediction
        .modes
        .iter()
        .map(|m| {
            format!(
                "{} {:.0} ms (blackout {:.0} ms)",
                m.mode, m.total_ms, m.blackout_ms
            )
        })
        .collect();
    run.say(format!(
        "auto: {:.0} MiB may hold data, guest dirties {:.0} MiB/s, link {:.0} MiB/s ({}); predicted {}; chose {}: {}",
        prediction.populated_mib,
        prediction.dirty_rate_mibs,
        prediction.link_rate_mibs,
        if link_rate_measured {
            "measured on the first pages"
        } else if options.bandwidth.is_some() {
            "the cap"
        } else {
            "assumed: too little to measure"
        },
        modes.join(", "),
        prediction.chosen,
        prediction.why
    ));
    run.report.mode = format!("auto: {}", mode.name());
    run.report.prediction = Some(prediction);
    let mut unsent = dirty;
    for r in slices.flatten() {
        unsent.set_range(r.gpa, r.bytes(), true);
    }
    Ok(AutoStart {
        mode,
        unsent,
        harvested,
    })
}

/// Hello, then the Offer; returns the protocol version agreed on.
fn handshake<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut TcpStream,
    run: &mut Run<'_>,
) -> Result<u16, MigrateError> {
    let mut scratch = Vec::new();
    let stage = "handshake";
    write_message(stream, &Message::Hello(Hello::new(Role::Source)))
        .map_err(MigrateError::protocol(stage))?;
    let version = match recv_message(stream, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::HelloAck(HelloAck::Accepted { version }) => version,
        Message::HelloAck(HelloAck::Refused { reason }) => {
            return Err(MigrateError::Refused(reason))
        }
        Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
        other => {
            return Err(MigrateError::Unexpected {
                stage,
                expected: "HelloAck",
                got: other.kind(),
            })
        }
    };
    let offer = guest
        .describe()
        .map_err(MigrateError::guest("describing the VM"))?;
    run.report.mem_bytes = offer.mem_bytes;
    run.report.vcpus = offer.vcpus;
    run.ram_ranges = offer.ram_ranges.clone();
    let stage = "offering the VM";
    write_message(stream, &Message::Offer(offer)).map_err(MigrateError::protocol(stage))?;
    match recv_message(stream, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::Accept(_) => Ok(version),
        Message::Refuse(r) => Err(MigrateError::Refused(r.reason)),
        Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "Accept or Refuse",
            got: other.kind(),
        }),
    }
}

/// Sends one round of pages and its RoundEnd; records it in the report.
fn send_round<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut TcpStream,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    blackout: bool,
) -> Result<SentCounts, MigrateError> {
    let stage = if blackout {
        "sending the last pages"
    } else {
        "sending pages"
    };
    let round_bytes: u64 = runs.iter().map(PageRun::bytes).sum();
    let start = Instant::now();
    let base = sender.total;
    let phase = if blackout { "blackout" } else { "round" };
    run.tell(phase, round, round_bytes, 0, start, true);
    let mut last_sample = -TIMELINE_EVERY_MS;
    let sent = {
        let mut on_batch = |total: &SentCounts| {
            let in_round = (total.pages - base.pages) * PAGE_SIZE as u64;
            let now_ms = run.ms();
            if now_ms - last_sample >= TIMELINE_EVERY_MS {
                last_sample = now_ms;
                let bytes = run.report.bytes_sent + (total.bytes - base.bytes);
                run.report.timeline.push((now_ms, bytes));
            }
            run.tell(phase, round, round_bytes, in_round, start, false);
        };
        sender
            .send_runs(
                &|gpa, dst| guest.read(gpa, dst),
                stream,
                runs,
                &mut on_batch,
            )
            .map_err(|e| e.at(stage))?
    };
    end_round(stream, run, (round, stage), sent, start, blackout)
}

/// Rounds at least this large go out on the page-data streams, when there
/// are any: below it, starting the threads costs more than they save.
const STRIPED_ROUND_MIN_BYTES: u64 = 64 << 20;

/// Asks for `options.streams` page-data streams when that is more than one
/// and the destination speaks a protocol that has them; None otherwise.
fn open_streams_if_asked<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut TcpStream,
    options: &PrecopyOptions,
    version: u16,
    run: &mut Run<'_>,
) -> Result<Option<Streams>, MigrateError> {
    if options.streams <= 1 || options.mode == Mode::Postcopy {
        return Ok(None);
    }
    if version < STREAMS_VERSION {
        run.say(format!(
            "the destination speaks protocol v{version}, which has one stream only (several need v{STREAMS_VERSION})"
        ));
        return Ok(None);
    }
    let reader = guest.memory_reader().map_err(MigrateError::guest(
        "sharing guest memory with the page-data streams",
    ))?;
    let streams = open_streams(stream, options.streams, reader, options.io_timeout)?;
    match &streams {
        Some(s) => run.report.streams = s.count() as u32,
        None => run.say(
            "the destination cannot take page-data streams (it has no listener); one stream".into(),
        ),
    }
    Ok(streams)
}

/// A round sent on the page-data streams: StripedRound on the main
/// connection, the pages on the streams, then the round's RoundEnd.
fn send_round_striped(
    streams: &Streams,
    main: &mut TcpStream,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    bandwidth: Option<u64>,
) -> Result<SentCounts, MigrateError> {
    let stage = "sending pages";
    let round_bytes: u64 = runs.iter().map(PageRun::bytes).sum();
    let start = Instant::now();
    run.tell("round", round, round_bytes, 0, start, true);
    write_message(main, &Message::StripedRound(StripedRound { round }))
        .map_err(MigrateError::protocol(stage))?;
    let mut last_sample = -TIMELINE_EVERY_MS;
    let tick = Duration::from_secs_f64(TIMELINE_EVERY_MS / 1e3);
    let sent = send_striped(streams, round, runs, bandwidth, tick, &mut |total| {
        let now_ms = run.ms();
        if now_ms - last_sample >= TIMELINE_EVERY_MS {
            last_sample = now_ms;
            let bytes = run.report.bytes_sent + total.bytes;
            run.report.timeline.push((now_ms, bytes));
        }
        let in_round = total.pages * PAGE_SIZE as u64;
        run.tell("round", round, round_bytes, in_round, start, false);
    })?;
    end_round(main, run, (round, stage), sent, start, false)
}

/// Ends a round that was sent: its RoundEnd with the page count on the
/// main connection, and its row in the totals and the report.
fn end_round(
    main: &mut TcpStream,
    run: &mut Run<'_>,
    (round, stage): (u32, &'static str),
    sent: SentCounts,
    start: Instant,
    blackout: bool,
) -> Result<SentCounts, MigrateError> {
    let end = RoundEnd {
        round,
        pages: sent.pages,
    };
    write_message(main, &Message::RoundEnd(end)).map_err(MigrateError::protocol(stage))?;
    let duration_ms = start.elapsed().as_secs_f64() * 1e3;
    run.report.bytes_sent += sent.bytes;
    run.report.pages_sent += sent.pages;
    run.report.zero_pages += sent.zero_pages;
    let now_ms = run.ms();
    run.report.timeline.push((now_ms, run.report.bytes_sent));
    run.report.rounds.push(RoundReport {
        round,
        pages: sent.pages,
        zero_pages: sent.zero_pages,
        bytes_sent: sent.bytes,
        duration_ms,
        throughput_mibs: mib_per_s(sent.bytes, duration_ms),
        dirty_rate_mibs: 0.0,
        throttle_percent: run.throttle,
        blackout,
    });
    Ok(sent)
}

/// Hybrid looks at the guest's dirty rate this often while a round is sent.
const WATCH_CHUNK_PAGES: u64 = 4096;
/// ... once the round has run this long (a shorter rate says little).
const WATCH_AFTER: Duration = Duration::from_millis(100);

/// How a watched round ended.
enum Watched {
    /// Sent whole; the pages the guest dirtied meanwhile (already
    /// harvested, so the next harvest does not report them again).
    Sent(SentCounts, PageBitmap),
    /// The guest outran the link mid-round: post-copy now. `needed` is the
    /// rest of the round and everything dirtied since it began.
    Outrun { needed: PageBitmap, reason: String },
}

/// Hybrid's round: sent in slices, with a look at the dirty log between
/// them, so a guest that dirties more than half of what the link sends is
/// moved by post-copy at once instead of after a whole pass.
#[allow(clippy::too_many_arguments)]
fn send_round_watching<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    dirty_since: Instant,
) -> Result<Watched, MigrateError> {
    let chunks = split_runs(runs, WATCH_CHUNK_PAGES);
    let start = Instant::now();
    let first_report = run.report.rounds.len();
    let mut seen = PageBitmap::new(&run.ram_ranges);
    let mut total = SentCounts::default();
    let mut outcome = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let sent = send_round(guest, stream, sender, run, round, chunk, false)?;
        total.pages += sent.pages;
        total.zero_pages += sent.zero_pages;
        total.bytes += sent.bytes;
        if i + 1 == chunks.len() || start.elapsed() < WATCH_AFTER || total.bytes < RATE_SAMPLE_MIN {
            continue;
        }
        let stage = "watching the guest's dirty rate";
        seen.union_with(&guest.harvest_dirty().map_err(MigrateError::guest(stage))?);
        let dirty_rate = seen.bytes() as f64 / dirty_since.elapsed().as_secs_f64().max(1e-6);
        let send_rate = total.bytes as f64 / start.elapsed().as_secs_f64().max(1e-6);
        if dirty_rate >= crate::policy::HYBRID_DIRTY_RATIO * send_rate {
            let mut needed = std::mem::replace(&mut seen, PageBitmap::new(&run.ram_ranges));
            for r in chunks[i + 1..].iter().flatten() {
                needed.set_range(r.gpa, r.bytes(), true);
            }
            let mib = |b: f64| b / (1 << 20) as f64;
            outcome = Some(Watched::Outrun {
                needed,
                reason: format!(
                    "in round {round} the guest dirtied {:.0} MiB/s while {:.0} MiB/s were sent: over half",
                    mib(dirty_rate),
                    mib(send_rate)
                ),
            });
            break;
        }
    }
    merge_round_reports(run, first_report);
    Ok(outcome.unwrap_or(Watched::Sent(total, seen)))
}

/// The slices of one watched round as one row of the report.
fn merge_round_reports(run: &mut Run<'_>, from: usize) {
    let parts = run.report.rounds.split_off(from);
    let Some(first) = parts.first() else {
        return;
    };
    let mut merged = first.clone();
    for p in &parts[1..] {
        merged.pages += p.pages;
        merged.zero_pages += p.zero_pages;
        merged.bytes_sent += p.bytes_sent;
        merged.duration_ms += p.duration_ms;
    }
    merged.throughput_mibs = mib_per_s(merged.bytes_sent, merged.duration_ms);
    run.report.rounds.push(merged);
}

/// `runs` cut into slices of at most `pages` pages each.
fn split_runs(runs: &[PageRun], pages: u64) -> Vec<Vec<PageRun>> {
    let mut out = vec![Vec::new()];
    let mut in_slice = 0u64;
    for r in runs {
        let mut gpa = r.gpa;
        let mut left = u64::from(r.pages);
        while left > 0 {
            if in_slice == pages {
                out.push(Vec::new());
                in_slice = 0;
            }
            let n = left.min(pages - in_slice);
            out.last_mut().expect("never empty").push(PageRun {
                gpa,
                pages: n as u32,
            });
            gpa += n * PAGE_SIZE as u64;
            left -= n;
            in_slice += n;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn blackout<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    mut dirty: PageBitmap,
    predicted: Duration,
    forced: bool,
) -> Result<(), MigrateError> {
    let t_pause = Instant::now();
    guest
        .pause()
        .map_err(MigrateError::guest("pausing the VM"))?;
    run.paused = true;
    run.throttle = 0;
    let pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    let last = guest
        .harvest_dirty()
        .map_err(MigrateError::guest("harvesting the last dirty pages"))?;
    dirty.union_with(&last);
    let sent = send_round(guest, stream, sender, run, round, &dirty.runs(), true)?;

    let handed = hand_over(guest, stream, run, run.recoverable_commit)?;
    let b = &mut run.report.blackout;
    b.host_downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    b.predicted_ms = predicted.as_secs_f64() * 1e3;
    b.forced = forced;
    b.pause_ms = pause_ms;
    b.final_pages = sent.pages;
    b.final_bytes = sent.bytes;
    handed.record(b);
    run.report.total_ms = run.ms();
    run.report.throughput_mibs = mib_per_s(
        run.report.bytes_sent,
        run.report.total_ms - run.report.setup_ms,
    );
    Ok(())
}

/// What handing the state over measured.
struct HandedOver {
    state_bytes: u64,
    state_save_ms: f64,
    state_load_ms: f64,
    commit_ms: f64,
}

impl HandedOver {
    fn record(&self, b: &mut crate::stats::BlackoutReport) {
        b.state_bytes = self.state_bytes;
        b.state_save_ms = self.state_save_ms;
        b.state_load_ms = self.state_load_ms;
        b.commit_ms = self.commit_ms;
    }
}

/// With the VM paused: sends the state record, waits until the destination
/// loaded exactly it, then commits. From the Commit on, the VM is the
/// destination's.
fn hand_over<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    run: &mut Run<'_>,
    recovery: Option<(Duration, Duration)>,
) -> Result<HandedOver, MigrateError> {
    if let Some((window, io_timeout)) = recovery {
        let stage = "preparing the commit";
        let addr = stream.peer_addr().map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
        let session = new_session();
        write_message(stream, &Message::Prepare(Prepare { session }))
            .map_err(MigrateError::protocol(stage))?;
        run.commit_recovery = Some(CommitRecovery {
            addr,
            session,
            window,
            io_timeout,
        });
    }
    let t_save = Instant::now();
    let state = guest
        .save_state()
        .map_err(MigrateError::guest("saving the VM state"))?;
    let state_save_ms = t_save.elapsed().as_secs_f64() * 1e3;
    let t_state = Instant::now();
    let stage = "sending the VM state";
    write_state(stream, &state).map_err(MigrateError::protocol(stage))?;
    stream.flush().map_err(|e| MigrateError::Protocol {
        stage,
        source: e.into(),
    })?;
    let crc = crc32fast::hash(&state);
    let mut scratch = Vec::new();
    let stage = "waiting for the destination to load the state";
    match recv_message(stream, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::StateLoaded(ack) => {
            if ack.state_len != state.len() as u64 || ack.state_crc != crc {
                return Err(MigrateError::StateMismatch {
                    len: state.len() as u64,
                    crc,
                    got_len: ack.state_len,
                    got_crc: ack.state_crc,
                });
            }
        }
        Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
        other => {
            return Err(MigrateError::Unexpected {
                stage,
                expected: "StateLoaded",
                got: other.kind(),
            })
        }
    }
    let state_load_ms = t_state.elapsed().as_secs_f64() * 1e3;
    let t_commit = Instant::now();
    write_message(stream, &Message::Commit(Commit))
        .map_err(|e| MigrateError::CommitUnacknowledged(error_chain(&e)))?;
    run.commit_sent = true;
    let unacknowledged = match recv_message(stream, &mut scratch) {
        Ok(Message::Committed(_)) => None,
        Ok(other) => Some(format!(
            "the destination sent {} instead of Committed",
            other.kind()
        )),
        Err(e) => Some(error_chain(&e)),
    };
    if let Some(why) = unacknowledged {
        let Some(r) = run.commit_recovery else {
            return Err(MigrateError::CommitUnacknowledged(why));
        };
        run.say(format!(
            "no Committed ({why}); asking the destination again for up to {:?}",
            r.window
        ));
        let t_retry = Instant::now();
        *stream =
            decision::confirm_commit(r.addr, r.session, r.window, r.io_timeout).map_err(|e| {
                MigrateError::CommitUnacknowledged(format!("{why}; then: {}", error_chain(&e)))
            })?;
        run.report.blackout.commit_recovered = Some(format!(
            "{why}; the destination confirmed on a new connection {:.0} ms later",
            t_retry.elapsed().as_secs_f64() * 1e3
        ));
    }
    Ok(HandedOver {
        state_bytes: state.len() as u64,
        state_save_ms,
        state_load_ms,
        commit_ms: t_commit.elapsed().as_secs_f64() * 1e3,
    })
}

/// Moves the VM before the rest of its memory: opens the fault channel,
/// pauses, tells the destination which pages it lacks (`dirty`: those
/// dirtied since they were sent; None: nothing was sent, so every page
/// that may hold data), hands the state over and commits, then serves
/// pages until the destination holds them all.
#[allow(clippy::too_many_arguments)]
fn switch_to_postcopy<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    options: &PrecopyOptions,
    run: &mut Run<'_>,
    dirty: Option<PageBitmap>,
    predicted: Duration,
    reason: &str,
) -> Result<(), MigrateError> {
    let session = new_session();
    let fault = open_fault_channel(stream, session, options.io_timeout)?;

    let t_pause = Instant::now();
    guest
        .pause()
        .map_err(MigrateError::guest("pausing the VM"))?;
    run.paused = true;
    run.throttle = 0;
    let pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    let needed = match dirty {
        Some(mut dirty) => {
            let last = guest
                .harvest_dirty()
                .map_err(MigrateError::guest("harvesting the last dirty pages"))?;
            dirty.union_with(&last);
            dirty
        }
        None => {
            let mut all = PageBitmap::new(&run.ram_ranges);
            for r in guest
                .populated()
                .map_err(MigrateError::guest("finding the populated memory"))?
            {
                all.set_range(r.gpa, r.len, true);
            }
            all
        }
    };
    let stage = "telling the destination which pages it lacks";
    write_message(
        stream,
        &Message::PostcopyBegin(PostcopyBegin {
            pages: needed.count(),
            words: needed.to_words(),
        }),
    )
    .map_err(MigrateError::protocol(stage))?;
    // No Prepare: after a post-copy commit a broken link is the post-copy's
    // to recover (Resume), and before it the source keeps the VM.
    let handed = hand_over(guest, stream, run, None)?;
    run.postcopy_started = true;
    let b = &mut run.report.blackout;
    b.host_downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    b.predicted_ms = predicted.as_secs_f64() * 1e3;
    b.pause_ms = pause_ms;
    handed.record(b);

    let memory = guest
        .memory_reader()
        .map_err(MigrateError::guest("sharing the paused VM's memory"))?;
    let t_serve = Instant::now();
    let serve_options = ServeOptions {
        bandwidth: options.bandwidth,
        io_timeout: options.io_timeout,
        recovery: options.link_recovery,
        session,
    };
    let needed_bytes = needed.bytes();
    let served = serve(
        memory,
        stream,
        fault,
        &needed,
        &serve_options,
        &mut |event: ServeEvent| match event {
            ServeEvent::Progress(sent, total) => {
                let left = total.saturating_sub(sent) * PAGE_SIZE as u64;
                run.tell(
                    "postcopy",
                    0,
                    needed_bytes,
                    needed_bytes - left,
                    t_serve,
                    true,
                );
            }
            ServeEvent::Note(text) => run.say(text),
        },
    );
    let served = match served {
        Ok(served) => served,
        Err(failure) => {
            run.unfinished = failure.unfinished;
            return Err(failure.error);
        }
    };
    let duration_ms = t_serve.elapsed().as_secs_f64() * 1e3;
    run.report.postcopy = Some(served.report(reason, needed.count(), duration_ms));
    run.report.bytes_sent += served.bytes;
    run.report.pages_sent += served.pushed_pages + served.requested_pages;
    run.report.total_ms = run.ms();
    let now_ms = run.ms();
    run.report.timeline.push((now_ms, run.report.bytes_sent));
    run.report.throughput_mibs = mib_per_s(
        run.report.bytes_sent,
        run.report.total_ms - run.report.setup_ms,
    );
    Ok(())
}

/// A destination that gave up mid-round says why in an Abort frame; look
/// for one without blocking, between rounds.
fn poll_abort(stream: &mut TcpStream, scratch: &mut Vec<u8>) -> Result<(), MigrateError> {
    let stage = "checking on the destination";
    let io = |e: std::io::Error| MigrateError::Protocol {
        stage,
        source: e.into(),
    };
    stream.set_nonblocking(true).map_err(io)?;
    let mut byte = [0u8; 1];
    let peeked = stream.peek(&mut byte);
    stream.set_nonblocking(false).map_err(io)?;
    match peeked {
        Ok(0) => Err(MigrateError::Protocol {
            stage,
            source: crate::ProtocolError::PeerClosed,
        }),
        Ok(_) => {
            let header = read_header(stream).map_err(MigrateError::protocol(stage))?;
            match read_message(stream, &header, scratch).map_err(MigrateError::protocol(stage))? {
                Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
                other => Err(MigrateError::Unexpected {
                    stage,
                    expected: "nothing (or Abort)",
                    got: other.kind(),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// A write that failed because the destination hung up may have a reason
/// waiting in the stream: an Abort it sent before closing. Prefer that.
fn peer_reason(stream: &mut TcpStream, error: MigrateError) -> MigrateError {
    let link_failed =
        matches!(&error, MigrateError::Protocol { source, .. } if source.is_retryable());
    if !link_failed {
        return error;
    }
    if stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return error;
    }
    let mut scratch = Vec::new();
    // Skip what the destination sent before its Abort (nothing, normally).
    for _ in 0..4 {
        match recv_message(stream, &mut scratch) {
            Ok(Message::Abort(a)) => return MigrateError::PeerAborted(a.reason),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    error
}

/// After the commit: the destination's word on what the guest saw.
fn wait_guest_report(stream: &mut TcpStream, wait: Duration) -> GuestSeen {
    if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
        return GuestSeen::default();
    }
    let mut scratch = Vec::new();
    match recv_message(stream, &mut scratch) {
        Ok(Message::Resumed(r)) => GuestSeen {
            stall_ms: r.guest_stall_us.map(|us| us as f64 / 1e3),
            first_seq: r.first_seq,
        },
        _ => GuestSeen::default(),
    }
}

fn ranges_to_runs(ranges: &[RamRange]) -> Vec<PageRun> {
    let mut out = Vec::new();
    for r in ranges {
        push_run(&mut out, r.gpa, r.len / PAGE_SIZE as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_split_into_slices_of_at_most_n_pages() {
        let page = PAGE_SIZE as u64;
        let runs = [
            PageRun { gpa: 0, pages: 5 },
            PageRun {
                gpa: 100 * page,
                pages: 2,
            },
        ];
        let slices = split_runs(&runs, 3);
        let sizes: Vec<u64> = slices
            .iter()
            .map(|s| s.iter().map(|r| u64::from(r.pages)).sum())
            .collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        assert_eq!(
            slices[1][0],
            PageRun {
                gpa: 3 * page,
                pages: 2
            }
        );
        assert_eq!(
            slices[1][1],
            PageRun {
                gpa: 100 * page,
                pages: 1
            }
        );
        assert_eq!(split_runs(&[], 3), vec![Vec::new()]);
    }
}
