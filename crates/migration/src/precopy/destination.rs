//! The destination side: answer the handshake, judge the offer and reserve
//! the VM (through the caller's `accept`), write every page into memory
//! nothing runs on, load the state, and start the VM only after `Commit`.
//! Any failure before that drops the incoming VM: nothing is left.

use crate::transport::{Link, Listener};
use std::io::Write;

use crate::thread_priority::Boost;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::guest::IncomingGuest;
use crate::postcopy::channel::accept_fault_channel;
use crate::postcopy::PostcopyHandle;
use crate::precopy::decision;
use crate::precopy::error::{error_chain, ReceiveError};
use crate::precopy::parallel_receive::{accept_streams, receive_striped_round};
use crate::protocol::{
    read_header, read_message, read_pages_into, read_state, write_message, Abort, Accept,
    Committed, FrameKind, HelloAck, Message, Offer, PageSink, PayloadCheck, PostcopyReady, Refuse,
    Resumed, Role, Started, StateLoaded, StreamsOpened, VersionRange, BLACKOUT_TIMING_VERSION,
};

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Longest silence from the source before the migration is abandoned.
    pub io_timeout: Duration,
    /// How long a post-copy whose link failed waits for the source to come
    /// back before it declares the VM lost; also how long a prepared
    /// migration whose link failed waits for the source's decision, and
    /// how long after a commit a source that lost our Committed is
    /// answered.
    pub link_recovery: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(30),
            link_recovery: Duration::from_secs(30),
        }
    }
}

/// What the destination measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReceiveReport {
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Offer to Accept: the compatibility check and the reservation.
    pub reserve_ms: f64,
    pub rounds: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub state_bytes: u64,
    /// Decoding and loading the state record.
    pub load_ms: f64,
    /// Commit received to vCPUs started.
    pub start_ms: f64,
    pub total_ms: f64,
    /// Pages the VM started without (post-copy), fetched after the start.
    pub postcopy_pages: Option<u64>,
    /// The protocol version agreed on.
    pub version: u16,
    /// The thread's scheduling from the source's BlackoutBegins to the
    /// start (v5).
    pub thread_priority: Option<String>,
    #[serde(skip)]
    pub commit: Option<CommitTiming>,
}

/// When this side read the Commit and answered it: the destination's share
/// of the blackout is measured from here to the first vCPU's entry. Also how
/// long it took from holding the last pages to acknowledging the state, so
/// the source can tell the last pages' arrival from the state's load.
#[derive(Debug, Clone, Copy)]
pub struct CommitTiming {
    pub read: Instant,
    pub replied: Instant,
    pub last_pages_to_state_acked: Option<std::time::Duration>,
}

/// A received VM, running, and the stream to tell the source how the guest
/// fared ([`send_resumed`]). After a post-copy switch the VM runs while
/// `postcopy` still fetches its missing pages; the stream is then the
/// post-copy's, and the guest's report goes through the handle.
pub struct Received<R> {
    pub vm: R,
    pub report: ReceiveReport,
    pub stream: Link,
    pub postcopy: Option<PostcopyHandle>,
}

/// Receives one VM over `stream`. `accept` judges the offer and builds the
/// incoming VM, or says why not (the source is told, and keeps its VM).
/// `listener` is where the source opens the fault channel if it switches
/// to post-copy; without one, post-copy is refused.
pub fn receive<G: IncomingGuest>(
    mut stream: Link,
    listener: Option<&Listener>,
    options: &ReceiveOptions,
    accept: impl FnOnce(&Offer) -> Result<G, String>,
) -> Result<Received<G::Running>, ReceiveError> {
    let t0 = Instant::now();
    let mut report = ReceiveReport::default();
    let result = drive(&mut stream, listener, options, accept, &mut report);
    match result {
        Ok((vm, postcopy)) => {
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            Ok(Received {
                vm,
                report,
                stream,
                postcopy,
            })
        }
        Err(e) => {
            // Tell the source why, unless it is the one that gave up.
            if !matches!(e, ReceiveError::SourceAborted(_) | ReceiveError::Refused(_)) {
                let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = write_message(
                    &mut stream,
                    &Message::Abort(Abort {
                        reason: format!("destination: {}", error_chain(&e)),
                    }),
                );
                linger(&mut stream);
            }
            Err(e)
        }
    }
}

/// Closes gracefully after an Abort: closing a socket with unread data
/// makes the kernel send a reset, which can destroy the Abort before the
/// source reads it. So stop sending, and read (and drop) what the source
/// still sends until it notices, for a bounded time.
fn linger(stream: &mut Link) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// How long a failed destination keeps draining the source's stream.
const LINGER: Duration = Duration::from_secs(2);

/// Once the first vCPU entered the guest here (at `first_run`): this
/// side's share of the blackout, for the source to add up the downtime
/// (v5; best effort, the source may have gone).
pub fn send_started(stream: &mut Link, report: &ReceiveReport, first_run: Instant) {
    let Some(commit) = report.commit else { return };
    if report.version < BLACKOUT_TIMING_VERSION {
        return;
    }
    let us = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
    let _ = write_message(
        stream,
        &Message::Started(Started {
            commit_to_run_us: us(commit.read, first_run),
            commit_to_reply_us: us(commit.read, commit.replied),
            last_pages_to_state_acked_us: commit
                .last_pages_to_state_acked
                .map_or(0, |d| d.as_micros() as u64),
        }),
    );
    let _ = stream.flush();
}

/// After the VM ran on this side: what the guest measured, for the
/// source's report. Best effort: the source may have gone.
pub fn send_resumed(stream: &mut Link, guest_stall_us: Option<u64>, first_seq: Option<u64>) {
    let _ = write_message(
        stream,
        &Message::Resumed(Resumed {
            guest_stall_us,
            first_seq,
        }),
    );
    let _ = stream.flush();
}

type StartedVm<R> = (R, Option<PostcopyHandle>);

fn drive<G: IncomingGuest>(
    stream: &mut Link,
    listener: Option<&Listener>,
    options: &ReceiveOptions,
    accept: impl FnOnce(&Offer) -> Result<G, String>,
    report: &mut ReceiveReport,
) -> Result<StartedVm<G::Running>, ReceiveError> {
    let stage = "setting up the connection";
    let io = |e: std::io::Error| ReceiveError::Protocol {
        stage,
        source: e.into(),
    };
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(options.io_timeout))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(options.io_timeout))
        .map_err(io)?;
    let mut scratch = Vec::new();

    let stage = "handshake";
    let hello = match next_message(stream, &mut scratch, stage)? {
        Message::Hello(h) => h,
        other => return Err(unexpected(stage, "Hello", other.kind())),
    };
    let ack = hello.answer(VersionRange::SUPPORTED, Role::Destination);
    write_message(stream, &Message::HelloAck(ack.clone()))
        .map_err(ReceiveError::protocol(stage))?;
    if let HelloAck::Refused { reason } = ack {
        return Err(ReceiveError::Refused(reason));
    }
    if let HelloAck::Accepted { version } = ack {
        report.version = version;
    }

    let stage = "judging the offer";
    let offer = match next_message(stream, &mut scratch, stage)? {
        Message::Offer(o) => o,
        other => return Err(unexpected(stage, "Offer", other.kind())),
    };
    report.mem_bytes = offer.mem_bytes;
    report.vcpus = offer.vcpus;
    let t_reserve = Instant::now();
    let judged = offer
        .validate()
        .map_err(|e| format!("invalid offer: {e}"))
        .and_then(|()| accept(&offer));
    let mut guest = match judged {
        Ok(g) => g,
        Err(reason) => {
            let _ = write_message(
                stream,
                &Message::Refuse(Refuse {
                    reason: reason.clone(),
                }),
            );
            return Err(ReceiveError::Refused(reason));
        }
    };
    report.reserve_ms = t_reserve.elapsed().as_secs_f64() * 1e3;
    write_message(
        stream,
        &Message::Accept(Accept {
            reserved_bytes: offer.mem_bytes,
        }),
    )
    .map_err(ReceiveError::protocol(stage))?;

    let mut sink = TrackingSink {
        guest: &mut guest,
        // A copied disk's pages too: one that turns to zero must be zeroed.
        written: PageBitmap::new(&offer.migrated_ranges()),
    };
    let mut round_pages = 0u64;
    let mut state_len = None;
    let mut fault_channel: Option<Link> = None;
    let mut session = 0;
    let mut missing: Option<PageBitmap> = None;
    let mut data_streams: Option<Vec<Link>> = None;
    // Set by a v4 source: a broken link after StateLoaded is waited out.
    let mut prepared: Option<u64> = None;
    // From the source's pause to the start, nothing here may be starved.
    let mut boost: Option<Boost> = None;
    let mut commit_read = None;
    // The blackout's last RoundEnd read, and StateLoaded written.
    let mut last_pages_in = None;
    let mut state_acked = None;
    let stage = "receiving pages";
    loop {
        let header = match read_header(stream) {
            Ok(header) => header,
            Err(e) if state_len.is_some() && e.is_retryable() => {
                let (Some(session), Some(listener)) = (prepared, listener) else {
                    return Err(ReceiveError::protocol(stage)(e));
                };
                let (conn, commit) =
                    decision::await_decision(listener, session, options.link_recovery).map_err(
                        |why| ReceiveError::NoDecision {
                            link: error_chain(&e),
                            why,
                        },
                    )?;
                *stream = conn;
                if !commit {
                    return Err(ReceiveError::SourceAborted(
                        "the source came back after the link broke and chose to abort".into(),
                    ));
                }
                break;
            }
            Err(e) => return Err(ReceiveError::protocol(stage)(e)),
        };
        match header.kind {
            FrameKind::Pages => {
                let got = read_pages_into(
                    stream,
                    &header,
                    PayloadCheck::accepted_on(stream.is_tls()),
                    &mut sink,
                )
                .map_err(ReceiveError::protocol(stage))?;
                round_pages += got.pages();
                report.pages += got.pages();
                report.zero_pages += got.zero_pages;
            }
            FrameKind::State => {
                let stage = "loading the VM state";
                let mut state = Vec::new();
                read_state(stream, &header, &mut state).map_err(ReceiveError::protocol(stage))?;
                let t_load = Instant::now();
                sink.guest
                    .load_state(&state)
                    .map_err(|source| ReceiveError::Guest { stage, source })?;
                report.load_ms = t_load.elapsed().as_secs_f64() * 1e3;
                report.state_bytes = state.len() as u64;
                write_message(
                    stream,
                    &Message::StateLoaded(StateLoaded {
                        state_len: state.len() as u64,
                        state_crc: crc32fast::hash(&state),
                    }),
                )
                .map_err(ReceiveError::protocol(stage))?;
                state_len = Some(state.len());
                state_acked = Some(Instant::now());
            }
            kind => {
                let message = read_message(stream, &header, &mut scratch)
                    .map_err(ReceiveError::protocol(stage))?;
                match message {
                    Message::RoundEnd(end) => {
                        if end.pages != round_pages {
                            return Err(ReceiveError::PageCount {
                                round: end.round,
                                said: end.pages,
                                got: round_pages,
                            });
                        }
                        report.rounds = end.round;
                        round_pages = 0;
                        if boost.is_some() {
                            last_pages_in = Some(Instant::now());
                        }
                    }
                    Message::Commit(_) if state_len.is_some() => {
                        commit_read = Some(Instant::now());
                        break;
                    }
                    Message::BlackoutBegins(_) if state_len.is_none() => {
                        let b = boost.get_or_insert_with(Boost::start);
                        report.thread_priority = Some(b.level.describe());
                    }
                    Message::Prepare(p) if state_len.is_none() => prepared = Some(p.session),
                    Message::StreamsOpen(open) if data_streams.is_none() && state_len.is_none() => {
                        let stage = "opening the page-data streams";
                        let opened = match listener {
                            Some(l) => {
                                accept_streams(l, open.session, open.count, options.io_timeout)?
                            }
                            None => Vec::new(),
                        };
                        let count = opened.len() as u16;
                        write_message(stream, &Message::StreamsOpened(StreamsOpened { count }))
                            .map_err(ReceiveError::protocol(stage))?;
                        data_streams = Some(opened).filter(|s| !s.is_empty());
                    }
                    Message::StripedRound(striped) if state_len.is_none() => {
                        let Some(streams) = &data_streams else {
                            return Err(ReceiveError::Streams(format!(
                                "round {} is striped, but no page-data streams were opened",
                                striped.round
                            )));
                        };
                        let got = receive_striped_round(
                            streams,
                            sink.guest.ram_mut(),
                            &sink.written,
                            striped.round,
                        )?;
                        for (run, holds_data) in got.changes {
                            sink.written.set_range(run.gpa, run.bytes(), holds_data);
                        }
                        round_pages += got.pages;
                        report.pages += got.pages;
                        report.zero_pages += got.zero_pages;
                    }
                    Message::PostcopyPrepare(_) if offer.copies_disks => {
                        // Its blocks would be left on the source, which a
                        // crash there would lose with the VM.
                        return Err(ReceiveError::Postcopy(
                            "the source asked for post-copy of a VM whose disk it copies; a copied disk moves only by pre-copy".into(),
                        ));
                    }
                    Message::PostcopyPrepare(p) if fault_channel.is_none() => {
                        let stage = "opening the fault channel";
                        let Some(listener) = listener else {
                            return Err(ReceiveError::Postcopy(
                                "this destination was started without a listener for the fault channel".into(),
                            ));
                        };
                        session = p.session;
                        fault_channel = Some(
                            accept_fault_channel(listener, p.session)
                                .map_err(ReceiveError::Postcopy)?,
                        );
                        write_message(stream, &Message::PostcopyReady(PostcopyReady))
                            .map_err(ReceiveError::protocol(stage))?;
                    }
                    Message::PostcopyBegin(b) if fault_channel.is_some() && state_len.is_none() => {
                        let set = PageBitmap::from_words(&offer.ram_ranges, &b.words)
                            .filter(|set| set.count() == b.pages)
                            .ok_or_else(|| {
                                ReceiveError::Postcopy(format!(
                                    "the set of {} missing pages does not fit the offered memory",
                                    b.pages
                                ))
                            })?;
                        missing = Some(set);
                    }
                    Message::Abort(a) => return Err(ReceiveError::SourceAborted(a.reason)),
                    _ => {
                        return Err(unexpected(
                            stage,
                            if state_len.is_some() {
                                "Commit"
                            } else {
                                "Pages, RoundEnd or State"
                            },
                            kind,
                        ))
                    }
                }
            }
        }
    }
    // Committed: the VM is ours from here on, whatever happens to the link.
    let t_start = Instant::now();
    let stage = "starting the VM after the commit";
    let started = match (missing, fault_channel) {
        (Some(missing), Some(fault)) => {
            report.postcopy_pages = Some(missing.count());
            let (vm, lazy) = guest
                .start_lazy(&missing)
                .map_err(|source| ReceiveError::Guest { stage, source })?;
            // A v11 source forwards the VM's frames between the pages.
            let net = if crate::handover::forwards_during_postcopy(report.version) {
                G::network_of(&vm)
            } else {
                None
            };
            let main = stream
                .try_clone()
                .map_err(|e| ReceiveError::protocol(stage)(e.into()))?;
            let recovery = crate::postcopy::destination::Recovery {
                listener: listener
                    .map(Listener::try_clone)
                    .transpose()
                    .map_err(|e| ReceiveError::protocol(stage)(e.into()))?,
                session,
                timeout: options.link_recovery,
            };
            let handle = PostcopyHandle::start(lazy, missing, main, fault, recovery, net)
                .map_err(|e| ReceiveError::protocol(stage)(e.into()))?;
            (vm, Some(handle))
        }
        _ => {
            let vm = guest
                .start()
                .map_err(|source| ReceiveError::Guest { stage, source })?;
            (vm, None)
        }
    };
    report.start_ms = t_start.elapsed().as_secs_f64() * 1e3;
    let _ = write_message(stream, &Message::Committed(Committed));
    let _ = stream.flush();
    report.commit = commit_read.map(|read| CommitTiming {
        read,
        replied: Instant::now(),
        last_pages_to_state_acked: last_pages_in
            .zip(state_acked)
            .map(|(a, b)| b.saturating_duration_since(a)),
    });
    drop(boost);
    // In case that Committed is lost: a pre-copy source comes back for
    // it. (A post-copy source comes back with Resume instead, to the
    // post-copy's own wait on the listener.)
    // Failing that (no thread or descriptor to spare), such a source stays
    // in doubt, as before v4: the VM runs here all the same.
    if let (Some(session), Some(listener), None) = (prepared, listener, &started.1) {
        let _ = decision::answer_late_decisions(listener, session, options.link_recovery);
    }
    Ok(started)
}

fn next_message(
    stream: &mut Link,
    scratch: &mut Vec<u8>,
    stage: &'static str,
) -> Result<Message, ReceiveError> {
    let header = read_header(stream).map_err(ReceiveError::protocol(stage))?;
    let message = read_message(stream, &header, scratch).map_err(ReceiveError::protocol(stage))?;
    if let Message::Abort(a) = message {
        return Err(ReceiveError::SourceAborted(a.reason));
    }
    Ok(message)
}

fn unexpected(stage: &'static str, expected: &'static str, got: FrameKind) -> ReceiveError {
    ReceiveError::Unexpected {
        stage,
        expected,
        got,
    }
}

/// Writes pages into the incoming VM and remembers which it wrote, so a
/// zero run clears only pages that hold data (fresh memory is zero).
struct TrackingSink<'g, G> {
    guest: &'g mut G,
    written: PageBitmap,
}

impl<G: IncomingGuest> PageSink for TrackingSink<'_, G> {
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        self.written.set_range(gpa, len as u64, true);
        self.guest.memory_mut(gpa, len)
    }

    fn zero_range(&mut self, gpa: u64, len: u64) -> bool {
        let Some(mem) = self.guest.memory_mut(gpa, len as usize) else {
            return false;
        };
        zero_written_pages(mem, gpa, &self.written);
        self.written.set_range(gpa, len, false);
        true
    }
}

/// Zeroes the pages of `mem` (guest memory at `gpa`) that hold data from
/// an earlier round; the others already read as zero, and touching them
/// would only allocate memory to hold zeros.
pub(super) fn zero_written_pages(mem: &mut [u8], gpa: u64, written: &PageBitmap) {
    let page = crate::protocol::PAGE_SIZE;
    for (i, chunk) in mem.chunks_exact_mut(page).enumerate() {
        if written.contains(gpa + (i * page) as u64) {
            chunk.fill(0);
        }
    }
}
