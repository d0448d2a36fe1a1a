//! The page scanner and sender: copies runs of guest pages into a batch
//! buffer, tells zero pages apart (they travel as zero runs, no payload),
//! and writes each batch as one Pages frame, paced to the bandwidth cap.

use std::io::Write;
use std::time::Instant;

use crate::bandwidth::Pacer;
use crate::guest::GuestError;
use crate::protocol::{
    write_pages, PageRun, PayloadCheck, MAX_BATCH_DATA_BYTES, MAX_BATCH_RUNS, PAGE_SIZE,
};
use crate::ProtocolError;

/// Page data per frame: small enough that copying, checksumming and
/// writing a batch stay in the CPU's caches, large enough that the frame
/// overhead is nothing. Several streams' batches and socket buffers share
/// one core's L2 (2 MiB here): on the 4-stream fill, 256-512 KiB reach
/// 23-24 Gbit/s where 1 MiB reaches 20-21. Tunable by FERRY_BATCH_KIB for
/// experiments.
const BATCH_BYTES: usize = 256 << 10;

/// Copies guest memory at a guest address into a buffer.
pub type ReadFn<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), GuestError>;

/// What sending a set of runs did.
#[derive(Debug, Clone, Copy, Default)]
pub struct SentCounts {
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes on the wire (frame payloads, headers not counted).
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("reading guest memory failed: {0}")]
    Guest(GuestError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl SendError {
    /// The migration's error for a send that failed at `stage`.
    pub(crate) fn at(self, stage: &'static str) -> crate::precopy::error::MigrateError {
        use crate::precopy::error::MigrateError;
        match self {
            Self::Guest(source) => MigrateError::Guest { stage, source },
            Self::Protocol(source) => MigrateError::Protocol { stage, source },
        }
    }
}

/// A pending run inside the batch buffer: where its pages start.
#[derive(Debug, Clone, Copy)]
struct Staged {
    run: PageRun,
    offset: usize,
}

pub struct PageSender {
    buf: Vec<u8>,
    cap: usize,
    filled: usize,
    data: Vec<Staged>,
    zeros: Vec<PageRun>,
    pacer: Pacer,
    check: PayloadCheck,
    /// Totals over the sender's life.
    pub total: SentCounts,
}

impl PageSender {
    pub fn new(pacer: Pacer) -> Self {
        let batch = std::env::var("FERRY_BATCH_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(BATCH_BYTES, |kib| {
                (kib << 10).clamp(64 << 10, MAX_BATCH_DATA_BYTES)
            });
        let cap = pacer.batch_bytes(batch);
        Self {
            buf: vec![0; cap],
            cap,
            filled: 0,
            data: Vec::new(),
            zeros: Vec::new(),
            pacer,
            check: PayloadCheck::Crc32,
            total: SentCounts::default(),
        }
    }

    /// Sends its frames protected as `check` says (`PayloadCheck::for_link`).
    pub fn with_check(mut self, check: PayloadCheck) -> Self {
        self.check = check;
        self
    }

    /// Sends every page of `runs`; `on_batch` hears the totals after each
    /// frame (for progress and the bytes-over-time record).
    pub fn send_runs(
        &mut self,
        read: ReadFn<'_>,
        w: &mut impl Write,
        runs: &[PageRun],
        on_batch: &mut dyn FnMut(&SentCounts),
    ) -> Result<SentCounts, SendError> {
        let before = self.total;
        for run in runs {
            let mut gpa = run.gpa;
            let mut left = u64::from(run.pages);
            while left > 0 {
                let room = (self.cap - self.filled) / PAGE_SIZE;
                if room == 0
                    || self.data.len() + 2 > MAX_BATCH_RUNS
                    || self.zeros.len() + 2 > MAX_BATCH_RUNS
                {
                    self.flush(w, on_batch)?;
                    continue;
                }
                let n = left.min(room as u64) as usize;
                self.stage(read, gpa, n)?;
                gpa += (n * PAGE_SIZE) as u64;
                left -= n as u64;
            }
        }
        self.flush(w, on_batch)?;
        Ok(SentCounts {
            pages: self.total.pages - before.pages,
            zero_pages: self.total.zero_pages - before.zero_pages,
            bytes: self.total.bytes - before.bytes,
        })
    }

    /// Copies `n` pages at `gpa` into the buffer and sorts them into data
    /// and zero runs. Zero pages keep their slot in the buffer (unsent).
    fn stage(&mut self, read: ReadFn<'_>, gpa: u64, n: usize) -> Result<(), SendError> {
        let start = self.filled;
        let bytes = n * PAGE_SIZE;
        read(gpa, &mut self.buf[start..start + bytes]).map_err(SendError::Guest)?;
        self.filled += bytes;
        for i in 0..n {
            let offset = start + i * PAGE_SIZE;
            let page_gpa = gpa + (i * PAGE_SIZE) as u64;
            if is_zero(&self.buf[offset..offset + PAGE_SIZE]) {
                match self.zeros.last_mut() {
                    Some(z) if z.gpa + z.bytes() == page_gpa => z.pages += 1,
                    _ => self.zeros.push(PageRun {
                        gpa: page_gpa,
                        pages: 1,
                    }),
                }
            } else {
                match self.data.last_mut() {
                    Some(d)
                        if d.run.gpa + d.run.bytes() == page_gpa
                            && d.offset + d.run.bytes() as usize == offset =>
                    {
                        d.run.pages += 1
                    }
                    _ => self.data.push(Staged {
                        run: PageRun {
                            gpa: page_gpa,
                            pages: 1,
                        },
                        offset,
                    }),
                }
            }
        }
        Ok(())
    }

    fn flush(
        &mut self,
        w: &mut impl Write,
        on_batch: &mut dyn FnMut(&SentCounts),
    ) -> Result<(), SendError> {
        if self.data.is_empty() && self.zeros.is_empty() {
            self.filled = 0;
            return Ok(());
        }
        let runs: Vec<PageRun> = self.data.iter().map(|s| s.run).collect();
        let slices: Vec<&[u8]> = self
            .data
            .iter()
            .map(|s| &self.buf[s.offset..s.offset + s.run.bytes() as usize])
            .collect();
        let data_bytes: u64 = runs.iter().map(PageRun::bytes).sum();
        let payload = data_bytes + 8 + 12 * (runs.len() + self.zeros.len()) as u64;
        let wait = self.pacer.delay_for(payload, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        write_pages(w, &runs, &self.zeros, &slices, self.check)?;
        let zero_pages: u64 = self.zeros.iter().map(|z| u64::from(z.pages)).sum();
        self.total.pages += data_bytes / PAGE_SIZE as u64 + zero_pages;
        self.total.zero_pages += zero_pages;
        self.total.bytes += payload;
        self.data.clear();
        self.zeros.clear();
        self.filled = 0;
        on_batch(&self.total);
        Ok(())
    }
}

/// True if the page holds only zero bytes; stops at the first non-zero
/// word, so data pages cost a few loads.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8-byte chunk")) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_found() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
    }
}
