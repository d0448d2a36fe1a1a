//! The destination during post-copy: the VM already runs here. Three
//! threads fill its memory: the fault service turns each access to a
//! missing page into a request on the fault channel (or places a zero page
//! when the source never had data there); the request receiver places the
//! answers; and the push receiver (the handle's own thread) places the
//! background push from the main connection, notices when every page is
//! here, and tells the source. A link that fails leaves the VM waiting on
//! its missing pages (it never runs on memory it does not have) while the
//! destination waits for the source to come back with `Resume`; then both
//! connections are opened again and every page not yet here is sent.
//! The push receiver also delivers the VM's forwarded frames (v11) into
//! its card, until the source's `ForwardEnd`, even after the last page.

use crate::transport::{Link, Listener};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::guest::{GuestError, LazyMemory};
use crate::handover::{DeliverReport, DestinationNetwork};
use crate::postcopy::channel::{accept_fault_channel, wait_readable};
use crate::postcopy::latency;
use crate::postcopy::net_intake::NetIntake;
use crate::protocol::{
    read_header, read_message, read_pages_into, recv_message, write_message, Abort, FrameKind,
    Message, PageRequest, PageSink, PayloadCheck, PostcopyComplete, PostcopyReady, ResumeState,
    Resumed, PAGE_SIZE,
};
use crate::reconnect;
use crate::shared_pages::SharedPages;
use crate::ProtocolError;

const PAGE: u64 = PAGE_SIZE as u64;
/// How often the threads look up from waiting to check on each other.
const POLL: Duration = Duration::from_millis(20);
/// How long a finished post-copy waits for the guest's first heartbeat
/// before it closes the connection without reporting the guest's stall.
const RESUMED_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("{stage}: {source}")]
    Link {
        stage: &'static str,
        source: ProtocolError,
    },
    #[error("{stage}: {source}")]
    Memory {
        stage: &'static str,
        source: GuestError,
    },
    #[error("the source aborted post-copy: {0}")]
    SourceAborted(String),
    #[error("the link to the source failed ({reason}) and the source did not come back within {waited:?}")]
    SourceLost { reason: String, waited: Duration },
    #[error("{stage}: the source sent {got} where {expected} belongs")]
    Unexpected {
        stage: &'static str,
        expected: &'static str,
        got: FrameKind,
    },
}

impl PostcopyError {
    fn link(stage: &'static str) -> impl FnOnce(ProtocolError) -> Self {
        move |source| Self::Link { stage, source }
    }

    fn io(stage: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |e| Self::Link {
            stage,
            source: e.into(),
        }
    }
}

struct Shared {
    lazy: Arc<dyn LazyMemory>,
    needed: PageBitmap,
    needed_count: u64,
    arrived: SharedPages,
    requested: SharedPages,
    stop: AtomicBool,
    /// Every page is here and the memory is being released: a placing
    /// call racing with that (a duplicate answer) may fail harmlessly.
    finished: AtomicBool,
    failure: Mutex<Option<PostcopyError>>,
    faults: AtomicU64,
    requested_pages: AtomicU64,
    /// When each outstanding request was sent.
    pending: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    started: Instant,
    last_page_us: AtomicU64,
    resumed: Mutex<Option<Resumed>>,
    /// Where requests go; None while the link is down (requests then wait
    /// in `pending` and are sent again on the next link).
    fault_writer: Mutex<Option<Link>>,
    link_down: AtomicBool,
    link_error: Mutex<Option<String>>,
    recoveries: AtomicU32,
    /// The VM's card, for the frames the source forwards.
    net: NetIntake,
}

impl Shared {
    fn fail(&self, e: PostcopyError) {
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        let mut first = self.failure.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
        self.stop.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// A connection failed: the threads stand by until the source is back.
    fn link_lost(&self, reason: String) {
        let mut first = self.link_error.lock().unwrap();
        if first.is_none() {
            *first = Some(reason);
        }
        self.link_down.store(true, Ordering::Release);
    }

    /// Asks the source for these pages; with the link down they stay
    /// pending, to be asked for again on the next link.
    fn request(&self, pages: &[u64]) {
        let mut writer = self.fault_writer.lock().unwrap();
        let Some(w) = writer.as_mut() else {
            return;
        };
        for &gpa in pages {
            let request = Message::PageRequest(PageRequest { gpa, pages: 1 });
            if let Err(e) = write_message(w, &request) {
                *writer = None;
                drop(writer);
                self.link_lost(format!("post-copy: requesting a page: {e}"));
                return;
            }
        }
    }

    fn link_is_down(&self) -> bool {
        self.link_down.load(Ordering::Acquire)
    }

    /// Records pages as here; the last one stamps the finish time.
    fn arrived(&self, gpa: u64, len: u64) {
        for page in 0..len / PAGE {
            let at = gpa + page * PAGE;
            if !self.arrived.insert(at) {
                continue;
            }
            if self.requested.contains(at) {
                if let Some(t) = self.pending.lock().unwrap().remove(&at) {
                    let us = t.elapsed().as_micros() as u64;
                    self.latencies_us.lock().unwrap().push(us);
                }
            }
        }
        if self.arrived.count() >= self.needed_count {
            let us = self.started.elapsed().as_micros() as u64;
            let _ = self.last_page_us.compare_exchange(
                0,
                us.max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }
}

/// A post-copy in progress; the VM runs meanwhile.
pub struct PostcopyHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<PostcopyComplete, PostcopyError>>>,
}

impl PostcopyHandle {
    /// Starts filling `lazy` with the pages in `needed`, fetched over
    /// `main` (the push) and `fault` (requests and their answers), and
    /// delivering into `net` the frames the source forwards on `main`
    /// (a v11 source; None: none come, or the VM has no card).
    pub(crate) fn start(
        lazy: Arc<dyn LazyMemory>,
        needed: PageBitmap,
        main: Link,
        fault: Link,
        recovery: Recovery,
        net: Option<Box<dyn DestinationNetwork>>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            lazy,
            needed_count: needed.count(),
            arrived: SharedPages::empty_like(&needed),
            requested: SharedPages::empty_like(&needed),
            needed,
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            failure: Mutex::new(None),
            faults: AtomicU64::new(0),
            requested_pages: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            started: Instant::now(),
            last_page_us: AtomicU64::new(0),
            resumed: Mutex::new(None),
            fault_writer: Mutex::new(Some(fault.try_clone()?)),
            link_down: AtomicBool::new(false),
            link_error: Mutex::new(None),
            recoveries: AtomicU32::new(0),
            net: NetIntake::new(net),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-push".into())
            .spawn(move || run(s, main, fault, recovery))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Pages the VM still lacks.
    pub fn missing_pages(&self) -> u64 {
        self.shared.needed_count - self.shared.arrived.count()
    }

    pub fn needed_pages(&self) -> u64 {
        self.shared.needed_count
    }

    /// Why the link is down, while it is (the VM then waits on its missing
    /// pages for the source to come back).
    pub fn link_down(&self) -> Option<String> {
        if !self.shared.link_is_down() {
            return None;
        }
        Some(
            self.shared
                .link_error
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        )
    }

    /// True when this post-copy delivers the VM's forwarded frames and
    /// opens this host's network to it (the caller must not).
    pub fn forwards_network(&self) -> bool {
        self.shared.net.present()
    }

    /// The delivery of forwarded frames so far (final once finished).
    pub fn network_report(&self) -> Option<DeliverReport> {
        self.shared.net.report()
    }

    /// How many times the source came back after a link failure.
    pub fn recoveries(&self) -> u32 {
        self.shared.recoveries.load(Ordering::Acquire)
    }

    /// True once post-copy ended, either way; `wait` then returns at once.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// What the guest reported after it ran here, for the source's report
    /// (sent once every page is here).
    pub fn note_resumed(&self, guest_stall_us: Option<u64>, first_seq: Option<u64>) {
        *self.shared.resumed.lock().unwrap() = Some(Resumed {
            guest_stall_us,
            first_seq,
        });
    }

    /// Waits for the end: every page here, or the reason it cannot be.
    pub fn wait(mut self) -> Result<PostcopyComplete, PostcopyError> {
        let thread = self.thread.take().expect("waited on once");
        thread.join().expect("the post-copy thread does not panic")
    }
}

/// Where a post-copy whose link failed waits for its source.
pub struct Recovery {
    pub listener: Option<Listener>,
    pub session: u64,
    pub timeout: Duration,
}

/// The push receiver, which also owns the other two threads and brings
/// the links back after a failure.
fn run(
    shared: Arc<Shared>,
    mut main: Link,
    mut fault_reader: Link,
    recovery: Recovery,
) -> Result<PostcopyComplete, PostcopyError> {
    let faults = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve_faults(&s))
            .map_err(PostcopyError::io("starting the post-copy threads"))?
    };
    loop {
        let answers = {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("postcopy-answers".into())
                .spawn(move || receive_answers(&s, fault_reader))
        };
        let answers = match answers {
            Ok(a) => a,
            Err(e) => {
                shared.fail(PostcopyError::io("starting the post-copy threads")(e));
                break;
            }
        };
        match receive_push(&shared, &mut main) {
            Ok(()) => {}
            Err(e @ PostcopyError::Link { .. }) => shared.link_lost(e.to_string()),
            Err(e) => shared.fail(e),
        }
        if shared.stopped()
            || !shared.link_is_down()
            || shared.arrived.count() >= shared.needed_count
        {
            shared.stop.store(true, Ordering::Release);
            let _ = answers.join();
            break;
        }
        // The link failed: close both connections (so the source and our
        // answer receiver notice too) and wait for the source. Frames it
        // was forwarding are lost: the VM gets this host's network now.
        shared
            .net
            .give_up("the link to the source failed while it forwarded");
        let _ = main.shutdown(std::net::Shutdown::Both);
        if let Some(w) = shared.fault_writer.lock().unwrap().take() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        let _ = answers.join();
        match wait_for_source(&shared, &recovery) {
            Ok((m, f)) => {
                main = m;
                fault_reader = match f.try_clone() {
                    Ok(r) => r,
                    Err(e) => {
                        shared.fail(PostcopyError::io("resuming post-copy")(e));
                        break;
                    }
                };
                *shared.link_error.lock().unwrap() = None;
                *shared.fault_writer.lock().unwrap() = Some(f);
                shared.link_down.store(false, Ordering::Release);
                shared.recoveries.fetch_add(1, Ordering::AcqRel);
                resend_pending(&shared);
            }
            Err(reason) => {
                shared.fail(PostcopyError::SourceLost {
                    reason: shared
                        .link_error
                        .lock()
                        .unwrap()
                        .clone()
                        .map_or(reason.clone(), |r| format!("{r}; {reason}")),
                    waited: recovery.timeout,
                });
                break;
            }
        }
    }
    let finished =
        !shared.failure.lock().unwrap().is_some() && shared.arrived.count() >= shared.needed_count;
    if finished {
        // Every page is here: the mapping can stop intercepting.
        shared.finished.store(true, Ordering::Release);
        if let Err(source) = shared.lazy.finish() {
            shared.finished.store(false, Ordering::Release);
            shared.fail(PostcopyError::Memory {
                stage: "releasing guest memory from the fault service",
                source,
            });
        }
    }
    shared.stop.store(true, Ordering::Release);
    let _ = faults.join();
    if let Some(e) = shared.failure.lock().unwrap().take() {
        shared.net.give_up("post-copy failed");
        return Err(e);
    }
    let (p50, p99, max) = latency::summarize(&mut shared.latencies_us.lock().unwrap());
    let complete = PostcopyComplete {
        pages: shared.needed_count,
        requested_pages: shared.requested_pages.load(Ordering::Acquire),
        faults: shared.faults.load(Ordering::Acquire),
        fault_p50_us: p50,
        fault_p99_us: p99,
        fault_max_us: max,
        last_page_us: shared.last_page_us.load(Ordering::Acquire),
    };
    // Every page is here whatever happens to this message: a source that
    // never reads it keeps its VM paused, which is safe.
    let _ = write_message(&mut main, &Message::PostcopyComplete(complete.clone()));
    let _ = main.flush();
    after_complete(&shared, &mut main);
    shared
        .net
        .give_up("post-copy ended before the source's ForwardEnd");
    drain(&mut main);
    Ok(complete)
}

/// Once every page is here: tells the source how the guest fared (best
/// effort, for its report) and delivers the frames it still forwards.
fn after_complete(shared: &Shared, main: &mut Link) {
    const TICK: Duration = Duration::from_millis(5);
    let deadline = Instant::now() + RESUMED_WAIT;
    let mut told = false;
    let mut frames = FrameReader::default();
    loop {
        if !told {
            if let Some(r) = shared.resumed.lock().unwrap().take() {
                let _ = write_message(main, &Message::Resumed(r));
                let _ = main.flush();
                told = true;
            }
        }
        let forwarding = shared.net.expecting();
        if !forwarding && (told || Instant::now() >= deadline) {
            return;
        }
        if !forwarding {
            std::thread::sleep(TICK);
            continue;
        }
        shared.net.check_deadline();
        match wait_readable(main, TICK) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(why) = frames.next(shared, main) {
                    shared.net.give_up(&why);
                }
            }
            Err(e) => shared
                .net
                .give_up(&format!("waiting for forwarded frames: {e}")),
        }
    }
}

/// Reads one frame off the main connection after the last page: a
/// forwarded-frames message is delivered, a push batch still in flight
/// (its pages all came by the fault channel first) is dropped.
#[derive(Default)]
struct FrameReader {
    staging: Staging,
    scratch: Vec<u8>,
}

impl FrameReader {
    fn next(&mut self, shared: &Shared, main: &mut Link) -> Result<(), String> {
        let stage = "reading forwarded frames";
        let header = read_header(main).map_err(|e| format!("{stage}: {e}"))?;
        if header.kind == FrameKind::Pages {
            self.staging.clear();
            return read_pages_into(
                main,
                &header,
                PayloadCheck::accepted_on(main.is_tls()),
                &mut self.staging,
            )
            .map(|_| ())
            .map_err(|e| format!("{stage}: {e}"));
        }
        let message =
            read_message(main, &header, &mut self.scratch).map_err(|e| format!("{stage}: {e}"))?;
        shared
            .net
            .take(message)
            .map_err(|other| format!("{stage}: the source sent {}", other.kind()))
    }
}

/// Waits on the listener for the source to come back with `Resume` for
/// this session; answers with the pages held here and takes the new fault
/// channel. Err: why not, for a human.
fn wait_for_source(shared: &Shared, recovery: &Recovery) -> Result<(Link, Link), String> {
    let Some(listener) = &recovery.listener else {
        return Err("this destination has no listener to wait on".into());
    };
    // A connection that is not this source resuming is dropped.
    reconnect::wait_for_source(listener, recovery.timeout, |conn, first| {
        resume_handshake(shared, conn, first, listener, recovery.session)
    })
}

/// After the returning source's Hello: Resume{session}, our ResumeState,
/// then the fault channel.
fn resume_handshake(
    shared: &Shared,
    mut conn: Link,
    first: Message,
    listener: &Listener,
    session: u64,
) -> Result<(Link, Link), String> {
    let err = |e: &dyn std::fmt::Display| format!("resuming: {e}");
    let mut scratch = Vec::new();
    match first {
        Message::Resume(r) if r.session == session => {}
        other => {
            let _ = write_message(
                &mut conn,
                &Message::Abort(Abort {
                    reason: "no post-copy of that session runs here".into(),
                }),
            );
            return Err(format!(
                "resuming: expected our Resume, got {}",
                other.kind()
            ));
        }
    }
    let held = shared.arrived.snapshot();
    write_message(
        &mut conn,
        &Message::ResumeState(ResumeState {
            pages: held.count(),
            words: held.to_words(),
        }),
    )
    .map_err(|e| err(&e))?;
    match recv_message(&mut conn, &mut scratch).map_err(|e| err(&e))? {
        Message::PostcopyPrepare(p) if p.session == session => {}
        other => {
            return Err(format!(
                "resuming: expected PostcopyPrepare, got {}",
                other.kind()
            ))
        }
    }
    let fault = accept_fault_channel(listener, session)?;
    write_message(&mut conn, &Message::PostcopyReady(PostcopyReady)).map_err(|e| err(&e))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| err(&e))?;
    Ok((conn, fault))
}

/// After a new link: asks again for every page a vCPU still waits on.
fn resend_pending(shared: &Shared) {
    let waiting: Vec<u64> = shared
        .pending
        .lock()
        .unwrap()
        .keys()
        .copied()
        .filter(|&gpa| !shared.arrived.contains(gpa))
        .collect();
    shared.request(&waiting);
}

/// Reads (and drops) what the source still had in flight, a push batch
/// whose pages all came by the fault channel first, until it closes:
/// closing with unread bytes would reset the connection under the source
/// before it read PostcopyComplete.
fn drain(main: &mut Link) {
    use std::io::Read;
    let _ = main.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + RESUMED_WAIT;
    let mut sink = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        match wait_readable(main, POLL) {
            Ok(true) => match main.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            Ok(false) => {}
            Err(_) => return,
        }
    }
}

/// Places the background push until every page is here.
fn receive_push(shared: &Shared, main: &mut Link) -> Result<(), PostcopyError> {
    let stage = "post-copy: receiving pushed pages";
    let mut staging = Staging::default();
    let mut scratch = Vec::new();
    while shared.arrived.count() < shared.needed_count {
        if shared.stopped() || shared.link_is_down() {
            return Ok(());
        }
        shared.net.check_deadline();
        if !wait_readable(main, POLL).map_err(PostcopyError::io(stage))? {
            continue;
        }
        let header = read_header(main).map_err(PostcopyError::link(stage))?;
        match header.kind {
            FrameKind::Pages => {
                staging.clear();
                read_pages_into(
                    main,
                    &header,
                    PayloadCheck::accepted_on(main.is_tls()),
                    &mut staging,
                )
                .map_err(PostcopyError::link(stage))?;
                staging.place(shared, stage)?;
            }
            kind => match shared.net.take(
                read_message(main, &header, &mut scratch).map_err(PostcopyError::link(stage))?,
            ) {
                Ok(()) => {}
                Err(Message::Abort(a)) => return Err(PostcopyError::SourceAborted(a.reason)),
                Err(_) => {
                    return Err(PostcopyError::Unexpected {
                        stage,
                        expected: "Pages",
                        got: kind,
                    })
                }
            },
        }
    }
    Ok(())
}

/// Turns accesses to missing pages into requests. While the link is down
/// the requests wait in `pending`; the vCPUs wait on their pages.
fn serve_faults(shared: &Shared) {
    crate::postcopy::channel::serve_faults_promptly();
    let stage = "post-copy: serving page faults";
    while !shared.stopped() {
        let gpa = match shared.lazy.next_fault(POLL) {
            Ok(Some(gpa)) => gpa,
            Ok(None) => continue,
            Err(source) => return shared.fail(PostcopyError::Memory { stage, source }),
        };
        shared.faults.fetch_add(1, Ordering::AcqRel);
        if !shared.needed.contains(gpa) {
            // Never written at the source: it is a zero page.
            if let Err(source) = shared.lazy.place_zero(gpa, PAGE) {
                return shared.fail(PostcopyError::Memory { stage, source });
            }
            continue;
        }
        if shared.arrived.contains(gpa) || !shared.requested.insert(gpa) {
            // Placed meanwhile (its waiters were woken), or already asked
            // for: the answer wakes every waiter.
            continue;
        }
        shared.pending.lock().unwrap().insert(gpa, Instant::now());
        shared.requested_pages.fetch_add(1, Ordering::AcqRel);
        shared.request(&[gpa]);
    }
}

/// Places the answers to requests, until this link fails.
fn receive_answers(shared: &Shared, mut fault: Link) {
    crate::postcopy::channel::serve_faults_promptly();
    let stage = "post-copy: receiving requested pages";
    let mut staging = Staging::default();
    let mut scratch = Vec::new();
    while !shared.stopped() && !shared.link_is_down() {
        match wait_readable(&fault, POLL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return shared.link_lost(format!("{stage}: {e}")),
        }
        let header = match read_header(&mut fault) {
            Ok(h) => h,
            // The source closes the channel only when it stops serving.
            Err(_) if shared.stopped() => return,
            Err(e) => return shared.link_lost(format!("{stage}: {e}")),
        };
        if header.kind != FrameKind::Pages {
            let got = header.kind;
            let _ = read_message(&mut fault, &header, &mut scratch);
            return shared.fail(PostcopyError::Unexpected {
                stage,
                expected: "Pages",
                got,
            });
        }
        staging.clear();
        if let Err(e) = read_pages_into(&mut fault, &header, PayloadCheck::Crc32, &mut staging) {
            if e.is_retryable() {
                return shared.link_lost(format!("{stage}: {e}"));
            }
            return shared.fail(PostcopyError::link(stage)(e));
        }
        if let Err(e) = staging.place(shared, stage) {
            return shared.fail(e);
        }
    }
}

/// Holds one verified batch before its pages are placed: a page placed is
/// visible to the guest at once, so nothing is placed before the frame's
/// checksum passed.
#[derive(Default)]
struct Staging {
    buf: Vec<u8>,
    filled: usize,
    data: Vec<(u64, usize, usize)>,
    zeros: Vec<(u64, u64)>,
}

impl Staging {
    fn clear(&mut self) {
        self.filled = 0;
        self.data.clear();
        self.zeros.clear();
    }

    fn place(&self, shared: &Shared, stage: &'static str) -> Result<(), PostcopyError> {
        for &(gpa, offset, len) in &self.data {
            shared
                .lazy
                .place(gpa, &self.buf[offset..offset + len])
                .map_err(|source| PostcopyError::Memory { stage, source })?;
            shared.arrived(gpa, len as u64);
        }
        for &(gpa, len) in &self.zeros {
            shared
                .lazy
                .place_zero(gpa, len)
                .map_err(|source| PostcopyError::Memory { stage, source })?;
            shared.arrived(gpa, len);
        }
        Ok(())
    }
}

impl PageSink for Staging {
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let offset = self.filled;
        if self.buf.len() < offset + len {
            self.buf.resize(offset + len, 0);
        }
        self.filled += len;
        self.data.push((gpa, offset, len));
        Some(&mut self.buf[offset..offset + len])
    }

    fn zero_range(&mut self, gpa: u64, len: u64) -> bool {
        self.zeros.push((gpa, len));
        true
    }
}
