//! The source during post-copy: the VM is paused here for good and its
//! memory no longer changes. One thread answers the destination's page
//! requests on the fault channel; this thread pushes every other page the
//! destination lacks on the main connection, starting next to the latest
//! request, then waits for the destination to say it has them all. With a
//! network device (v11) it slips the frames that reached the VM here in
//! between the pushed batches, as pre-copy forwards them after its commit.

use crate::transport::Link;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bandwidth::Pacer;
use crate::bitmap::PageBitmap;
use crate::guest::PageReader;
use crate::handover::{Forwarder, HandoverError, STRAY_POLL};
use crate::postcopy::channel::{link_failed, open_fault_channel, wait_readable};
use crate::precopy::error::error_chain as describe;
use crate::precopy::error::MigrateError;
use crate::precopy::send::{PageSender, SendError};
use crate::protocol::{
    recv_message, write_message, write_pages, Message, PageRun, PayloadCheck, PostcopyComplete,
    RamRange, Resume, PAGE_SIZE,
};
use crate::reconnect;
use crate::shared_pages::SharedPages;
use crate::stats::PostcopyReport;
use crate::ProtocolError;

/// The most pages one request may ask for.
pub const MAX_REQUEST_PAGES: u32 = 64;
/// How often the threads look up from waiting to check on each other.
const POLL: Duration = Duration::from_millis(20);
/// Pages per push batch (256 KiB): small, because every batch is one
/// UFFDIO_COPY on the destination and one send here, and a fault's answer
/// can wait for either to let go of a core. 1 MiB batches gave a remote
/// fault p99 of ~350 µs on this 2-core host, 256 KiB ~155 µs, at the same
/// push rate.
const PUSH_BATCH_PAGES: usize = 64;
/// Most forwarded-frame messages (of up to 64 frames each) between two
/// push batches: a burst of frames must not hold the pages up, and 8 of
/// them weigh less than one batch.
const FORWARD_BUDGET: usize = 8;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bandwidth cap, followed live (`PATCH /v1/migrations/{id}`).
    pub tuning: std::sync::Arc<crate::tuning::Tuning>,
    pub io_timeout: Duration,
    /// How long to keep trying to reach the destination again after the
    /// link failed; zero: give up at once.
    pub recovery: Duration,
    pub session: u64,
    /// How to reach the destination again (as the main connection was).
    pub dialer: crate::transport::Dialer,
}

impl Served {
    /// The report's post-copy part: what was served, why, and for how long.
    pub fn report(&self, reason: &str, needed_pages: u64, duration_ms: f64) -> PostcopyReport {
        let c = &self.complete;
        PostcopyReport {
            reason: reason.into(),
            needed_pages,
            pushed_pages: self.pushed_pages,
            requested_pages: self.requested_pages,
            faults: c.faults,
            fault_p50_us: c.fault_p50_us,
            fault_p99_us: c.fault_p99_us,
            fault_max_us: c.fault_max_us,
            last_page_ms: c.last_page_us as f64 / 1e3,
            duration_ms,
            bytes_sent: self.bytes,
            recoveries: self.recoveries,
        }
    }
}

/// What the post-copy phase did, as the source saw it.
pub struct Served {
    pub pushed_pages: u64,
    pub requested_pages: u64,
    pub bytes: u64,
    pub recoveries: u32,
    pub complete: PostcopyComplete,
}

#[derive(Default)]
struct ServerCounts {
    pages: AtomicU64,
    bytes: AtomicU64,
}

/// What the caller hears while post-copy runs.
pub enum ServeEvent {
    /// Pages sent so far of the total.
    Progress(u64, u64),
    /// Something the operator should read (a lost link, a resume).
    Note(String),
}

/// A post-copy this source gave up on after its link failed and did not
/// come back: everything needed to try again with [`resume`]. The VM must
/// stay paused here meanwhile; its memory is the only copy of these pages.
pub struct Unfinished {
    memory: Arc<dyn PageReader>,
    needed: PageBitmap,
    options: ServeOptions,
    addr: SocketAddr,
    /// Why it stopped, for a human.
    pub reason: String,
}

impl Unfinished {
    pub fn destination(&self) -> SocketAddr {
        self.addr
    }

    /// Pages the destination lacked when post-copy began.
    pub fn needed_pages(&self) -> u64 {
        self.needed.count()
    }
}

impl std::fmt::Debug for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unfinished")
            .field("destination", &self.addr)
            .field("pages", &self.needed.count())
            .field("reason", &self.reason)
            .finish()
    }
}

/// A post-copy that failed, and (when the link was the cause) what it
/// takes to resume it.
pub(crate) struct ServeFailure {
    pub error: MigrateError,
    pub unfinished: Option<Box<Unfinished>>,
}

/// Serves `needed` until the destination holds every page of it. A link
/// that fails is opened again (for up to `options.recovery`): the
/// destination says which pages it holds and the rest is sent again. The
/// VM stays paused here meanwhile, and every page stays here. `forward`
/// (the VM's frames, v11) goes out between the batches while it lasts; a
/// failed link ends it (the destination then opens its network).
pub(crate) fn serve(
    memory: Arc<dyn PageReader>,
    main: &mut Link,
    fault: Link,
    needed: &PageBitmap,
    options: &ServeOptions,
    forward: Option<&mut Forwarder<'_>>,
    events: &mut dyn FnMut(ServeEvent),
) -> Result<Served, Box<ServeFailure>> {
    let addr = main.peer_addr().map_err(|e| {
        Box::new(ServeFailure {
            error: MigrateError::Protocol {
                stage: "post-copy",
                source: e.into(),
            },
            unfinished: None,
        })
    })?;
    let sent = SharedPages::empty_like(needed);
    serve_from(
        memory, main, fault, needed, sent, addr, options, forward, events,
    )
}

/// Tries again a post-copy the source gave up on: reconnects (for up to
/// the recovery time), learns which pages the destination holds and sends
/// the rest. On failure the same `Unfinished` comes back, to try again.
pub fn resume(
    u: Box<Unfinished>,
    events: &mut dyn FnMut(ServeEvent),
) -> Result<Served, (MigrateError, Box<Unfinished>)> {
    let (mut main, fault, held) = match reconnect(u.addr, &u.needed, &u.options) {
        Ok(resumed) => resumed,
        Err(e) => return Err((e, u)),
    };
    events(ServeEvent::Note(format!(
        "post-copy resumed: the destination holds {} of {} pages; sending the rest",
        held.count(),
        u.needed.count()
    )));
    let sent = SharedPages::from_bitmap(&held);
    match serve_from(
        u.memory.clone(),
        &mut main,
        fault,
        &u.needed,
        sent,
        u.addr,
        &u.options,
        None,
        events,
    ) {
        Ok(served) => Ok(served),
        Err(f) => {
            let again = f.unfinished.unwrap_or_else(|| {
                Box::new(Unfinished {
                    reason: describe(&f.error),
                    ..*u
                })
            });
            Err((f.error, again))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn serve_from(
    memory: Arc<dyn PageReader>,
    main: &mut Link,
    mut fault: Link,
    needed: &PageBitmap,
    mut sent: SharedPages,
    addr: SocketAddr,
    options: &ServeOptions,
    mut forward: Option<&mut Forwarder<'_>>,
    events: &mut dyn FnMut(ServeEvent),
) -> Result<Served, Box<ServeFailure>> {
    let counts = ServerCounts::default();
    let (mut pushed_pages, mut push_bytes, mut recoveries) = (0, 0, 0);
    loop {
        match serve_link(
            &*memory,
            main,
            fault,
            needed,
            &sent,
            options,
            &counts,
            forward.as_deref_mut(),
            events,
        ) {
            Ok((pages, bytes, complete)) => {
                return Ok(Served {
                    pushed_pages: pushed_pages + pages,
                    requested_pages: counts.pages.load(Ordering::Acquire),
                    bytes: push_bytes + bytes + counts.bytes.load(Ordering::Acquire),
                    recoveries,
                    complete,
                });
            }
            Err((error, pages, bytes)) => {
                pushed_pages += pages;
                push_bytes += bytes;
                if let Some(f) = forward.as_deref_mut() {
                    // Frames on a broken link are lost; the destination
                    // opened its network when the link failed.
                    f.abandon(format!("the link failed: {}", describe(&error)));
                }
                if !link_failed(&error) {
                    return Err(Box::new(ServeFailure {
                        error,
                        unfinished: None,
                    }));
                }
                events(ServeEvent::Note(format!(
                    "post-copy: the link to the destination failed ({}); the VM stays paused here with all its pages; reconnecting to {addr} for up to {:?}",
                    describe(&error),
                    options.recovery
                )));
                let (m, f, held) = match reconnect(addr, needed, options) {
                    Ok(r) => r,
                    Err(e) => {
                        let error = MigrateError::RecoveryFailed {
                            link: describe(&error),
                            last: describe(&e),
                            waited: options.recovery,
                        };
                        return Err(Box::new(ServeFailure {
                            unfinished: Some(Box::new(Unfinished {
                                memory,
                                needed: needed.clone(),
                                options: options.clone(),
                                addr,
                                reason: describe(&error),
                            })),
                            error,
                        }));
                    }
                };
                *main = m;
                fault = f;
                sent = SharedPages::from_bitmap(&held);
                recoveries += 1;
                events(ServeEvent::Note(format!(
                    "post-copy: reconnected; the destination holds {} of {} pages; sending the rest",
                    held.count(),
                    needed.count()
                )));
            }
        }
    }
}

/// Failure of one link, with the pages and bytes pushed before it.
type LinkFailure = (MigrateError, u64, u64);

/// Serves over one pair of connections until the destination holds every
/// page, or a connection fails.
#[allow(clippy::too_many_arguments)]
fn serve_link(
    memory: &dyn PageReader,
    main: &mut Link,
    fault: Link,
    needed: &PageBitmap,
    sent: &SharedPages,
    options: &ServeOptions,
    counts: &ServerCounts,
    mut forward: Option<&mut Forwarder<'_>>,
    events: &mut dyn FnMut(ServeEvent),
) -> Result<(u64, u64, PostcopyComplete), LinkFailure> {
    let hint = AtomicU64::new(u64::MAX);
    let stop = AtomicBool::new(false);
    let broken = AtomicBool::new(false);
    // Closing the fault channel from here unblocks the page server.
    let fault_closer = fault.try_clone().ok();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let served = answer_requests(memory, fault, needed, sent, &hint, &stop, counts);
            if served.is_err() {
                broken.store(true, Ordering::Release);
            }
            served
        });
        let mut pushed = (0, 0);
        let result = push(
            memory,
            main,
            needed,
            sent,
            &hint,
            &broken,
            options,
            forward.as_deref_mut(),
            events,
            &mut pushed,
        )
        .and_then(|()| wait_complete(main, options.io_timeout, &broken, forward));
        stop.store(true, Ordering::Release);
        if result.is_err() {
            if let Some(f) = &fault_closer {
                let _ = f.shutdown(std::net::Shutdown::Both);
            }
        }
        let answered = server.join().expect("the page server does not panic");
        match (result, answered) {
            (Ok(complete), _) => Ok((pushed.0, pushed.1, complete)),
            // A broken fault channel is the likelier first cause.
            (Err(_), Err(e)) | (Err(e), Ok(())) => Err((e, pushed.0, pushed.1)),
        }
    })
}

/// Opens both connections again and asks the destination which pages it
/// holds, retrying until `options.recovery` has passed.
fn reconnect(
    addr: std::net::SocketAddr,
    needed: &PageBitmap,
    options: &ServeOptions,
) -> Result<(Link, Link, PageBitmap), MigrateError> {
    reconnect::keep_trying(options.recovery, || try_resume(addr, needed, options))
}

fn try_resume(
    addr: std::net::SocketAddr,
    needed: &PageBitmap,
    options: &ServeOptions,
) -> Result<(Link, Link, PageBitmap), MigrateError> {
    let stage = "resuming post-copy";
    let mut main = reconnect::dial(&options.dialer, addr, options.io_timeout, stage)?;
    let mut scratch = Vec::new();
    write_message(
        &mut main,
        &Message::Resume(Resume {
            session: options.session,
        }),
    )
    .map_err(MigrateError::protocol(stage))?;
    let ranges: Vec<RamRange> = needed
        .ranges
        .iter()
        .map(|r| RamRange {
            gpa: r.gpa,
            len: r.pages * PAGE_SIZE as u64,
        })
        .collect();
    let held = match recv_message(&mut main, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::ResumeState(state) => PageBitmap::from_words(&ranges, &state.words)
            .filter(|h| h.count() == state.pages)
            .ok_or(MigrateError::Protocol {
                stage,
                source: ProtocolError::Malformed {
                    kind: crate::protocol::FrameKind::ResumeState,
                    reason: "the page set does not fit the VM's memory".into(),
                },
            })?,
        Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
        other => {
            return Err(MigrateError::Unexpected {
                stage,
                expected: "ResumeState",
                got: other.kind(),
            })
        }
    };
    let fault = open_fault_channel(&mut main, options.session, options.io_timeout)?;
    Ok((main, fault, held))
}

/// Sends every page of `needed` not yet sent by the page server, nearest
/// to the latest request first. Returns (pages, bytes) pushed.
#[allow(clippy::too_many_arguments)]
fn push(
    memory: &dyn PageReader,
    main: &mut Link,
    needed: &PageBitmap,
    sent: &SharedPages,
    hint: &AtomicU64,
    broken: &AtomicBool,
    options: &ServeOptions,
    mut forward: Option<&mut Forwarder<'_>>,
    events: &mut dyn FnMut(ServeEvent),
    pushed_total: &mut (u64, u64),
) -> Result<(), MigrateError> {
    let stage = "post-copy: pushing pages";
    let page = PAGE_SIZE as u64;
    let pages: Vec<u64> = needed
        .runs()
        .iter()
        .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * page))
        .collect();
    let total = pages.len() as u64;
    let mut sender = PageSender::new(Pacer::following(options.tuning.clone(), 1));
    let read = |gpa: u64, dst: &mut [u8]| memory.read(gpa, dst);
    let mut cursor = 0usize;
    let mut last_hint = u64::MAX;
    let mut last_progress = Instant::now();
    loop {
        if broken.load(Ordering::Acquire) {
            return Err(MigrateError::Protocol {
                stage,
                source: ProtocolError::PeerClosed,
            });
        }
        let h = hint.load(Ordering::Acquire);
        if h != last_hint {
            last_hint = h;
            cursor = pages.partition_point(|&p| p < h);
        }
        let mut runs: Vec<PageRun> = Vec::new();
        let mut taken = 0usize;
        let mut visited = 0usize;
        while taken < PUSH_BATCH_PAGES && visited < pages.len() {
            if cursor >= pages.len() {
                cursor = 0;
            }
            let gpa = pages[cursor];
            cursor += 1;
            visited += 1;
            if !sent.insert(gpa) {
                continue;
            }
            taken += 1;
            match runs.last_mut() {
                Some(r) if r.gpa + r.bytes() == gpa => r.pages += 1,
                _ => runs.push(PageRun { gpa, pages: 1 }),
            }
        }
        if runs.is_empty() {
            break;
        }
        if let Some(f) = forward.as_deref_mut() {
            pump(f, main, stage)?;
        }
        let before = sender.total.bytes;
        sender
            .send_runs(&read, main, &runs, &mut |_| {})
            .map_err(|e| match e {
                SendError::Guest(source) => MigrateError::Guest { stage, source },
                SendError::Protocol(source) => MigrateError::Protocol { stage, source },
            })?;
        pushed_total.0 += taken as u64;
        pushed_total.1 += sender.total.bytes - before;
        if last_progress.elapsed() >= Duration::from_millis(100) {
            last_progress = Instant::now();
            events(ServeEvent::Progress(sent.count(), total));
        }
    }
    events(ServeEvent::Progress(sent.count(), total));
    Ok(())
}

/// Forwards what is due now, between two batches; a link that fails
/// fails the push.
fn pump(f: &mut Forwarder<'_>, main: &mut Link, stage: &'static str) -> Result<(), MigrateError> {
    match f.pump(main, FORWARD_BUDGET) {
        Ok(_) => Ok(()),
        Err(HandoverError::Link { source, .. }) => Err(MigrateError::Protocol { stage, source }),
        // `pump` ends forwarding on a device failure and reports it.
        Err(HandoverError::Device { .. }) => Ok(()),
    }
}

/// After the push: the destination's word that every page is placed;
/// strays are forwarded meanwhile.
fn wait_complete(
    main: &mut Link,
    timeout: Duration,
    broken: &AtomicBool,
    mut forward: Option<&mut Forwarder<'_>>,
) -> Result<PostcopyComplete, MigrateError> {
    let stage = "post-copy: waiting for the destination to hold every page";
    let deadline = Instant::now() + timeout;
    let mut scratch = Vec::new();
    loop {
        if broken.load(Ordering::Acquire) {
            // A page the destination asks for can no longer be answered.
            return Err(MigrateError::Protocol {
                stage,
                source: ProtocolError::PeerClosed,
            });
        }
        let mut wait = POLL;
        if let Some(f) = forward.as_deref_mut().filter(|f| !f.is_done()) {
            pump(f, main, stage)?;
            if !f.is_done() {
                wait = STRAY_POLL;
            }
        }
        let ready = wait_readable(main, wait).map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
        if !ready {
            if Instant::now() >= deadline {
                return Err(MigrateError::Protocol {
                    stage,
                    source: ProtocolError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no word from the destination for {timeout:?}"),
                    )),
                });
            }
            continue;
        }
        match recv_message(main, &mut scratch).map_err(MigrateError::protocol(stage))? {
            Message::PostcopyComplete(c) => return Ok(c),
            Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
            other => {
                return Err(MigrateError::Unexpected {
                    stage,
                    expected: "PostcopyComplete",
                    got: other.kind(),
                })
            }
        }
    }
}

/// Answers page requests on the fault channel until told to stop.
fn answer_requests(
    memory: &dyn PageReader,
    mut fault: Link,
    needed: &PageBitmap,
    sent: &SharedPages,
    hint: &AtomicU64,
    stop: &AtomicBool,
    counts: &ServerCounts,
) -> Result<(), MigrateError> {
    crate::postcopy::channel::serve_faults_promptly();
    let stage = "post-copy: answering page requests";
    let mut scratch = Vec::new();
    let mut buf = vec![0u8; MAX_REQUEST_PAGES as usize * PAGE_SIZE];
    while !stop.load(Ordering::Acquire) {
        let ready = wait_readable(&fault, POLL).map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
        if !ready {
            continue;
        }
        let message = match recv_message(&mut fault, &mut scratch) {
            Ok(m) => m,
            // The destination closes the fault channel once it holds
            // every page; the main connection says whether that is it.
            Err(_) if stop.load(Ordering::Acquire) => return Ok(()),
            Err(e) => return Err(MigrateError::protocol(stage)(e)),
        };
        let request = match message {
            Message::PageRequest(r) => r,
            other => {
                return Err(MigrateError::Unexpected {
                    stage,
                    expected: "PageRequest",
                    got: other.kind(),
                })
            }
        };
        let len = request.pages as usize * PAGE_SIZE;
        if request.pages == 0 || request.pages > MAX_REQUEST_PAGES || !needed.contains(request.gpa)
        {
            return Err(MigrateError::Protocol {
                stage,
                source: ProtocolError::PageRangeRejected {
                    gpa: request.gpa,
                    len: len as u64,
                },
            });
        }
        memory
            .read(request.gpa, &mut buf[..len])
            .map_err(MigrateError::guest(stage))?;
        let run = PageRun {
            gpa: request.gpa,
            pages: request.pages,
        };
        write_pages(&mut fault, &[run], &[], &[&buf[..len]], PayloadCheck::Crc32)
            .map_err(MigrateError::protocol(stage))?;
        for i in 0..u64::from(request.pages) {
            sent.insert(request.gpa + i * PAGE_SIZE as u64);
        }
        hint.store(request.gpa + len as u64, Ordering::Release);
        counts
            .pages
            .fetch_add(u64::from(request.pages), Ordering::AcqRel);
        counts.bytes.fetch_add(len as u64, Ordering::AcqRel);
    }
    Ok(())
}
