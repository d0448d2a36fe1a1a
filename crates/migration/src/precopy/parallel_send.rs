//! The source's side of page data on several streams. One TCP stream is
//! bound by the core that copies into and out of it; a large round (the
//! first pass above all) goes faster spread over several, each with its own
//! thread, reading its own stripes of guest memory.

use crate::transport::Link;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bandwidth::Pacer;
use crate::guest::PageReader;
use crate::postcopy::channel::{new_session, JOIN_TIMEOUT};
use crate::precopy::error::MigrateError;
use crate::precopy::send::{PageSender, SentCounts};
use crate::precopy::stripes::deal;
use crate::protocol::{
    recv_message, write_message, Message, PageRun, PayloadCheck, RoundEnd, StreamJoin, StreamsOpen,
};

/// The page-data streams of one migration, and a reader of guest memory
/// their threads share.
pub(crate) struct Streams {
    conns: Vec<Link>,
    reader: Arc<dyn PageReader>,
    /// How their Pages frames are protected (the streams are dialed like
    /// the main connection, so they authenticate as it does).
    check: PayloadCheck,
}

impl Streams {
    pub(crate) fn count(&self) -> usize {
        self.conns.len()
    }
}

/// Asks the destination for `count` page-data streams and opens them.
/// None when the destination cannot take any (it then gets every round on
/// the main connection, as before).
pub(crate) fn open_streams(
    main: &mut Link,
    count: u16,
    reader: Arc<dyn PageReader>,
    check: PayloadCheck,
    io_timeout: Duration,
) -> Result<Option<Streams>, MigrateError> {
    let stage = "opening the page-data streams";
    let io = |e: std::io::Error| MigrateError::Protocol {
        stage,
        source: e.into(),
    };
    let session = new_session();
    write_message(main, &Message::StreamsOpen(StreamsOpen { session, count }))
        .map_err(MigrateError::protocol(stage))?;
    let addr = main.peer_addr().map_err(io)?;
    let mut conns = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let mut conn = main
            .dial_sibling(addr, JOIN_TIMEOUT)
            .map_err(|e| io(e.into()))?;
        conn.set_write_timeout(Some(io_timeout)).map_err(io)?;
        conn.set_read_timeout(Some(io_timeout)).map_err(io)?;
        write_message(
            &mut conn,
            &Message::StreamJoin(StreamJoin { session, index }),
        )
        .map_err(MigrateError::protocol(stage))?;
        conns.push(conn);
    }
    let mut scratch = Vec::new();
    match recv_message(main, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::StreamsOpened(o) if o.count == count => Ok(Some(Streams {
            conns,
            reader,
            check,
        })),
        Message::StreamsOpened(o) if o.count == 0 => Ok(None),
        Message::StreamsOpened(o) => Err(MigrateError::Streams(format!(
            "asked for {count} streams, the destination took {}",
            o.count
        ))),
        Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "StreamsOpened",
            got: other.kind(),
        }),
    }
}

/// Sends `runs` (one round) over every stream: each carries its stripes
/// and ends with its own RoundEnd. `tuning` holds the cap for all streams
/// together. `progress` hears the running totals every `tick` while the
/// threads send. The first failure closes every stream, so the other
/// threads stop at once.
pub(crate) fn send_striped(
    streams: &Streams,
    round: u32,
    runs: &[PageRun],
    tuning: &std::sync::Arc<crate::tuning::Tuning>,
    tick: Duration,
    progress: &mut dyn FnMut(SentCounts),
) -> Result<(SentCounts, Duration), MigrateError> {
    let stage = "sending pages on the page-data streams";
    let cpu_ns = AtomicU64::new(0);
    let count = streams.count();
    let pages = AtomicU64::new(0);
    let zero_pages = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let first_error: Mutex<Option<MigrateError>> = Mutex::new(None);
    let fail = |e: MigrateError| {
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
            for c in &streams.conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    };
    let totals = || SentCounts {
        pages: pages.load(Ordering::Relaxed),
        zero_pages: zero_pages.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
    };
    std::thread::scope(|scope| {
        let workers: Vec<_> = deal(runs, count)
            .into_iter()
            .zip(&streams.conns)
            .map(|(share, conn)| {
                let (fail, pages, zero_pages, bytes) = (&fail, &pages, &zero_pages, &bytes);
                let (reader, cpu_ns, check) = (&streams.reader, &cpu_ns, streams.check);
                scope.spawn(move || {
                    let cpu_start = crate::cpu_clock::thread_cpu_time();
                    let mut sender =
                        PageSender::new(Pacer::following(tuning.clone(), count as u64))
                            .with_check(check);
                    let mut seen = SentCounts::default();
                    let mut on_batch = |t: &SentCounts| {
                        pages.fetch_add(t.pages - seen.pages, Ordering::Relaxed);
                        zero_pages.fetch_add(t.zero_pages - seen.zero_pages, Ordering::Relaxed);
                        bytes.fetch_add(t.bytes - seen.bytes, Ordering::Relaxed);
                        seen = *t;
                    };
                    let mut conn = conn;
                    let sent = sender
                        .send_runs(
                            &|gpa, dst| reader.read(gpa, dst),
                            &mut conn,
                            &share,
                            &mut on_batch,
                        )
                        .map_err(|e| e.at(stage))
                        .and_then(|sent| {
                            let end = RoundEnd {
                                round,
                                pages: sent.pages,
                            };
                            write_message(&mut conn, &Message::RoundEnd(end))
                                .map_err(MigrateError::protocol(stage))
                        });
                    if let Err(e) = sent {
                        fail(e);
                    }
                    let cpu = crate::cpu_clock::thread_cpu_time().saturating_sub(cpu_start);
                    cpu_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
                })
            })
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(tick);
            progress(totals());
        }
        for w in workers {
            if w.join().is_err() {
                fail(MigrateError::Guest {
                    stage,
                    source: "a page-data stream's thread panicked".into(),
                });
            }
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((
        totals(),
        Duration::from_nanos(cpu_ns.load(Ordering::Relaxed)),
    ))
}
