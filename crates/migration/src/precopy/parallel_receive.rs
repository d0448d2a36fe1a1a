//! The destination's side of page data on several streams: it takes the
//! connections the source opens, then receives each striped round with one
//! thread per stream, each writing only the stripes of guest memory its
//! stream owns (so no two threads ever hold the same memory).

use crate::transport::{Link, Listener};
use std::net::Shutdown;
use std::sync::Mutex;
use std::time::Duration;

use crate::bitmap::PageBitmap;
use crate::postcopy::channel::accept_joining;
use crate::precopy::error::ReceiveError;
use crate::precopy::stripes::{cut, owner, MAX_STREAMS};
use crate::protocol::{
    read_header, read_message, read_pages_into, FrameKind, Message, PageRun, PageSink,
    PayloadCheck, PAGE_SIZE,
};

/// Takes the `count` streams of `session` on `listener`, in index order.
pub(crate) fn accept_streams(
    listener: &Listener,
    session: u64,
    count: u16,
    io_timeout: Duration,
) -> Result<Vec<Link>, ReceiveError> {
    if count == 0 || count > MAX_STREAMS {
        return Err(ReceiveError::Streams(format!(
            "the source asked for {count} streams; 1 to {MAX_STREAMS} are allowed"
        )));
    }
    let mut streams: Vec<Option<Link>> = (0..count).map(|_| None).collect();
    for _ in 0..count {
        let (conn, message) = accept_joining(listener, "a page-data stream", |m| {
            matches!(m, Message::StreamJoin(j)
                if j.session == session && j.index < count && streams[usize::from(j.index)].is_none())
        })
        .map_err(ReceiveError::Streams)?;
        let Message::StreamJoin(join) = message else {
            unreachable!("accept_joining returns only what the filter took");
        };
        conn.set_read_timeout(Some(io_timeout))
            .map_err(|e| ReceiveError::Streams(e.to_string()))?;
        streams[usize::from(join.index)] = Some(conn);
    }
    Ok(streams.into_iter().flatten().collect())
}

/// What one striped round brought.
#[derive(Debug, Default)]
pub(crate) struct StripedRound {
    pub pages: u64,
    pub zero_pages: u64,
    /// Page runs written (true) and zeroed (false), for the caller's record
    /// of which pages hold data. Runs never overlap within a round.
    pub changes: Vec<(PageRun, bool)>,
}

/// Receives round `round` on every stream at once. `ram` is all of guest
/// memory, one slice per RAM range; `written` the pages that hold data
/// before this round. The first failure closes every stream, so the other
/// threads stop at once instead of waiting out their timeouts.
pub(crate) fn receive_striped_round(
    streams: &[Link],
    ram: Vec<(u64, &mut [u8])>,
    written: &PageBitmap,
    round: u32,
) -> Result<StripedRound, ReceiveError> {
    let count = streams.len();
    let first_error: Mutex<Option<ReceiveError>> = Mutex::new(None);
    let fail = |e: ReceiveError| {
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
            for s in streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    };
    let results: Vec<Option<StripedRound>> = std::thread::scope(|scope| {
        let workers: Vec<_> = cut(ram, count)
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(index, (pieces, stream))| {
                let fail = &fail;
                scope.spawn(move || {
                    let mut sink = StripeSink {
                        index,
                        count,
                        pieces,
                        written,
                        got: StripedRound::default(),
                    };
                    let mut stream = stream;
                    match receive_stripe(&mut stream, &mut sink, round) {
                        Ok(()) => Some(sink.got),
                        Err(e) => {
                            fail(e);
                            None
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(None))
            .collect()
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut total = StripedRound::default();
    for got in results {
        let got = got.ok_or_else(|| {
            ReceiveError::Streams("a stream's receiver stopped without a reason".into())
        })?;
        total.pages += got.pages;
        total.zero_pages += got.zero_pages;
        total.changes.extend(got.changes);
    }
    Ok(total)
}

/// One stream's part of the round: Pages frames, then its RoundEnd.
fn receive_stripe(
    stream: &mut &Link,
    sink: &mut StripeSink<'_, '_>,
    round: u32,
) -> Result<(), ReceiveError> {
    let stage = "receiving pages on a page-data stream";
    let mut scratch = Vec::new();
    loop {
        let header = read_header(stream).map_err(ReceiveError::protocol(stage))?;
        if header.kind == FrameKind::Pages {
            let got = read_pages_into(
                stream,
                &header,
                PayloadCheck::accepted_on(stream.is_tls()),
                sink,
            )
            .map_err(ReceiveError::protocol(stage))?;
            sink.got.pages += got.pages();
            sink.got.zero_pages += got.zero_pages;
            continue;
        }
        match read_message(stream, &header, &mut scratch).map_err(ReceiveError::protocol(stage))? {
            Message::RoundEnd(end) if end.round == round => {
                if end.pages != sink.got.pages {
                    return Err(ReceiveError::PageCount {
                        round,
                        said: end.pages,
                        got: sink.got.pages,
                    });
                }
                return Ok(());
            }
            Message::Abort(a) => return Err(ReceiveError::SourceAborted(a.reason)),
            other => {
                return Err(ReceiveError::Unexpected {
                    stage,
                    expected: "Pages or this round's RoundEnd",
                    got: other.kind(),
                })
            }
        }
    }
}

/// The stripes one stream may write, and what it wrote.
struct StripeSink<'m, 'w> {
    index: usize,
    count: usize,
    /// (guest address, memory), ascending, none crossing a stripe boundary.
    pieces: Vec<(u64, &'m mut [u8])>,
    written: &'w PageBitmap,
    got: StripedRound,
}

impl StripeSink<'_, '_> {
    /// The piece holding `len` bytes at `gpa`, if this stream owns them.
    fn piece(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        if len == 0 || owner(gpa, self.count) != self.index {
            return None;
        }
        let at = self.pieces.partition_point(|(start, _)| *start <= gpa);
        let (start, mem) = self.pieces.get_mut(at.checked_sub(1)?)?;
        let offset = usize::try_from(gpa - *start).ok()?;
        mem.get_mut(offset..offset.checked_add(len)?)
    }
}

impl PageSink for StripeSink<'_, '_> {
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let run = PageRun {
            gpa,
            pages: (len / PAGE_SIZE) as u32,
        };
        self.got.changes.push((run, true));
        self.piece(gpa, len)
    }

    fn zero_range(&mut self, gpa: u64, len: u64) -> bool {
        let written = self.written;
        let Some(mem) = self.piece(gpa, len as usize) else {
            return false;
        };
        super::destination::zero_written_pages(mem, gpa, written);
        let run = PageRun {
            gpa,
            pages: (len / PAGE_SIZE as u64) as u32,
        };
        self.got.changes.push((run, false));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::precopy::stripes::STRIPE_BYTES;
    use crate::protocol::RamRange;

    #[test]
    fn a_stream_may_write_only_its_own_stripes() {
        let mut mem = vec![0u8; (4 * STRIPE_BYTES) as usize];
        let written = PageBitmap::new(&[RamRange {
            gpa: 0,
            len: 4 * STRIPE_BYTES,
        }]);
        let mut shares = cut(vec![(0, mem.as_mut_slice())], 2);
        let mut sink = StripeSink {
            index: 1,
            count: 2,
            pieces: shares.remove(1),
            written: &written,
            got: StripedRound::default(),
        };
        assert!(sink.data_target(STRIPE_BYTES, PAGE_SIZE).is_some());
        assert!(sink
            .data_target(2 * STRIPE_BYTES - 4096, PAGE_SIZE)
            .is_some());
        assert!(sink.data_target(3 * STRIPE_BYTES, PAGE_SIZE).is_some());
        assert!(
            sink.data_target(0, PAGE_SIZE).is_none(),
            "stream 0's stripe"
        );
        assert!(
            sink.data_target(2 * STRIPE_BYTES - 4096, 2 * PAGE_SIZE)
                .is_none(),
            "a run across the end of the stripe"
        );
        assert!(!sink.zero_range(2 * STRIPE_BYTES, PAGE_SIZE as u64));
    }
}
