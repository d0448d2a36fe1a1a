//! The destination during post-copy: the VM already runs here. Three
//! threads fill its memory: the fault service turns each access to a
//! missing page into a request on the fault channel (or places a zero page
//! when the source never had data there); the request receiver places the
//! answers; and the push receiver (the handle's own thread) places the
//! background push from the main connection, notices when every page is
//! here, and tells the source. A link that fails leaves the VM waiting on
//! its missing pages: it never runs on memory it does not have.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::guest::{GuestError, LazyMemory};
use crate::postcopy::channel::wait_readable;
use crate::postcopy::latency;
use crate::protocol::{
    read_header, read_message, read_pages_into, write_message, FrameKind, Message, PageRequest,
    PageSink, PostcopyComplete, Resumed, PAGE_SIZE,
};
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
    /// `main` (the push) and `fault` (requests and their answers).
    pub(crate) fn start(
        lazy: Arc<dyn LazyMemory>,
        needed: PageBitmap,
        main: TcpStream,
        fault: TcpStream,
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
        });
        let fault_reader = fault.try_clone()?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-push".into())
            .spawn(move || run(s, main, fault, fault_reader))?;
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

/// The push receiver, which also owns the other two threads.
fn run(
    shared: Arc<Shared>,
    mut main: TcpStream,
    fault_writer: TcpStream,
    fault_reader: TcpStream,
) -> Result<PostcopyComplete, PostcopyError> {
    let faults = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve_faults(&s, fault_writer))
    };
    let answers = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("postcopy-answers".into())
            .spawn(move || receive_answers(&s, fault_reader))
    };
    let (faults, answers) = match (faults, answers) {
        (Ok(f), Ok(a)) => (f, a),
        (Err(e), _) | (_, Err(e)) => {
            shared.fail(PostcopyError::io("starting the post-copy threads")(e));
            return Err(shared.failure.lock().unwrap().take().expect("just set"));
        }
    };
    let pushed = receive_push(&shared, &mut main);
    if let Err(e) = pushed {
        shared.fail(e);
    }
    let finished = !shared.stopped();
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
    let _ = answers.join();
    if let Some(e) = shared.failure.lock().unwrap().take() {
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
    let stage = "post-copy: telling the source every page is here";
    write_message(&mut main, &Message::PostcopyComplete(complete.clone()))
        .map_err(PostcopyError::link(stage))?;
    let _ = main.flush();
    // Best effort, for the source's report: the guest's own stall.
    let deadline = Instant::now() + RESUMED_WAIT;
    while Instant::now() < deadline {
        if let Some(r) = shared.resumed.lock().unwrap().take() {
            let _ = write_message(&mut main, &Message::Resumed(r));
            let _ = main.flush();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drain(&mut main);
    Ok(complete)
}

/// Reads (and drops) what the source still had in flight, a push batch
/// whose pages all came by the fault channel first, until it closes:
/// closing with unread bytes would reset the connection under the source
/// before it read PostcopyComplete.
fn drain(main: &mut TcpStream) {
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
fn receive_push(shared: &Shared, main: &mut TcpStream) -> Result<(), PostcopyError> {
    let stage = "post-copy: receiving pushed pages";
    let mut staging = Staging::default();
    let mut scratch = Vec::new();
    while shared.arrived.count() < shared.needed_count {
        if shared.stopped() {
            return Ok(());
        }
        if !wait_readable(main, POLL).map_err(PostcopyError::io(stage))? {
            continue;
        }
        let header = read_header(main).map_err(PostcopyError::link(stage))?;
        match header.kind {
            FrameKind::Pages => {
                staging.clear();
                read_pages_into(main, &header, &mut staging).map_err(PostcopyError::link(stage))?;
                staging.place(shared, stage)?;
            }
            kind => match read_message(main, &header, &mut scratch)
                .map_err(PostcopyError::link(stage))?
            {
                Message::Abort(a) => return Err(PostcopyError::SourceAborted(a.reason)),
                _ => {
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

/// Turns accesses to missing pages into requests.
fn serve_faults(shared: &Shared, mut fault: TcpStream) {
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
        let request = Message::PageRequest(PageRequest { gpa, pages: 1 });
        if let Err(e) = write_message(&mut fault, &request) {
            return shared.fail(PostcopyError::link("post-copy: requesting a page")(e));
        }
    }
}

/// Places the answers to requests.
fn receive_answers(shared: &Shared, mut fault: TcpStream) {
    crate::postcopy::channel::serve_faults_promptly();
    let stage = "post-copy: receiving requested pages";
    let mut staging = Staging::default();
    let mut scratch = Vec::new();
    while !shared.stopped() {
        match wait_readable(&fault, POLL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return shared.fail(PostcopyError::io(stage)(e)),
        }
        let header = match read_header(&mut fault) {
            Ok(h) => h,
            // The source closes the channel only when it stops serving.
            Err(_) if shared.stopped() => return,
            Err(e) => return shared.fail(PostcopyError::link(stage)(e)),
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
        let placed = read_pages_into(&mut fault, &header, &mut staging)
            .map_err(PostcopyError::link(stage))
            .and_then(|_| staging.place(shared, stage));
        if let Err(e) = placed {
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
