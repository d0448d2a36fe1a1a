//! The source during post-copy: the VM is paused here for good and its
//! memory no longer changes. One thread answers the destination's page
//! requests on the fault channel; this thread pushes every other page the
//! destination lacks on the main connection, starting next to the latest
//! request, then waits for the destination to say it has them all.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bandwidth::Pacer;
use crate::bitmap::PageBitmap;
use crate::guest::PageReader;
use crate::postcopy::channel::wait_readable;
use crate::precopy::error::MigrateError;
use crate::precopy::send::{PageSender, SendError};
use crate::protocol::{recv_message, write_pages, Message, PageRun, PostcopyComplete, PAGE_SIZE};
use crate::shared_pages::SharedPages;
use crate::ProtocolError;

/// The most pages one request may ask for.
pub const MAX_REQUEST_PAGES: u32 = 64;
/// How often the threads look up from waiting to check on each other.
const POLL: Duration = Duration::from_millis(20);
/// Pages per push batch: small enough that the push reacts to a new fault
/// within a fraction of a millisecond.
const PUSH_BATCH_PAGES: usize = 256;

pub(crate) struct ServeOptions {
    pub bandwidth: Option<u64>,
    pub io_timeout: Duration,
}

/// What the post-copy phase did, as the source saw it.
pub(crate) struct Served {
    pub pushed_pages: u64,
    pub requested_pages: u64,
    pub requests: u64,
    pub bytes: u64,
    pub complete: PostcopyComplete,
}

#[derive(Default)]
struct ServerCounts {
    requests: AtomicU64,
    pages: AtomicU64,
    bytes: AtomicU64,
}

/// Serves `needed` until the destination holds every page of it.
pub(crate) fn serve(
    memory: Arc<dyn PageReader>,
    main: &mut TcpStream,
    fault: TcpStream,
    needed: &PageBitmap,
    options: &ServeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Served, MigrateError> {
    let sent = SharedPages::empty_like(needed);
    let hint = AtomicU64::new(u64::MAX);
    let counts = ServerCounts::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let server =
            s.spawn(|| answer_requests(&*memory, fault, needed, &sent, &hint, &stop, &counts));
        let pushed = push(&*memory, main, needed, &sent, &hint, options, progress)
            .and_then(|pushed| wait_complete(main, options.io_timeout).map(|c| (pushed, c)));
        stop.store(true, Ordering::Release);
        let answered = server.join().expect("the page server does not panic");
        let ((pushed_pages, push_bytes), complete) = match (pushed, answered) {
            (Ok(done), _) => done,
            // The push failed: a broken fault channel is the likelier
            // first cause when both failed.
            (Err(e), Ok(())) | (Err(_), Err(e)) => return Err(e),
        };
        Ok(Served {
            pushed_pages,
            requested_pages: counts.pages.load(Ordering::Acquire),
            requests: counts.requests.load(Ordering::Acquire),
            bytes: push_bytes + counts.bytes.load(Ordering::Acquire),
            complete,
        })
    })
}

/// Sends every page of `needed` not yet sent by the page server, nearest
/// to the latest request first. Returns (pages, bytes) pushed.
fn push(
    memory: &dyn PageReader,
    main: &mut TcpStream,
    needed: &PageBitmap,
    sent: &SharedPages,
    hint: &AtomicU64,
    options: &ServeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, u64), MigrateError> {
    let stage = "post-copy: pushing pages";
    let page = PAGE_SIZE as u64;
    let pages: Vec<u64> = needed
        .runs()
        .iter()
        .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * page))
        .collect();
    let total = pages.len() as u64;
    let mut sender = PageSender::new(Pacer::new(options.bandwidth));
    let read = |gpa: u64, dst: &mut [u8]| memory.read(gpa, dst);
    let mut cursor = 0usize;
    let mut last_hint = u64::MAX;
    let mut pushed = 0u64;
    let mut last_progress = Instant::now();
    loop {
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
        sender
            .send_runs(&read, main, &runs, &mut |_| {})
            .map_err(|e| match e {
                SendError::Guest(source) => MigrateError::Guest { stage, source },
                SendError::Protocol(source) => MigrateError::Protocol { stage, source },
            })?;
        pushed += taken as u64;
        if last_progress.elapsed() >= Duration::from_millis(100) {
            last_progress = Instant::now();
            progress(sent.count(), total);
        }
    }
    progress(sent.count(), total);
    Ok((pushed, sender.total.bytes))
}

/// After the push: the destination's word that every page is placed.
fn wait_complete(
    main: &mut TcpStream,
    timeout: Duration,
) -> Result<PostcopyComplete, MigrateError> {
    let stage = "post-copy: waiting for the destination to hold every page";
    let deadline = Instant::now() + timeout;
    let mut scratch = Vec::new();
    loop {
        let ready = wait_readable(main, POLL).map_err(|e| MigrateError::Protocol {
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
    mut fault: TcpStream,
    needed: &PageBitmap,
    sent: &SharedPages,
    hint: &AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
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
        write_pages(&mut fault, &[run], &[], &[&buf[..len]])
            .map_err(MigrateError::protocol(stage))?;
        for i in 0..u64::from(request.pages) {
            sent.insert(request.gpa + i * PAGE_SIZE as u64);
        }
        hint.store(request.gpa + len as u64, Ordering::Release);
        counts.requests.fetch_add(1, Ordering::AcqRel);
        counts
            .pages
            .fetch_add(u64::from(request.pages), Ordering::AcqRel);
        counts.bytes.fetch_add(len as u64, Ordering::AcqRel);
    }
    Ok(())
}
