//! An owned, reusable page batch: the sender fills it page by page (runs
//! coalesce as it goes) and a receiver can read a Pages frame into it when
//! it wants the pages in hand rather than in a [`PageSink`](super::PageSink).

use std::io::{Read, Write};

use super::frame::{FrameHeader, FrameKind, PayloadCheck, PayloadReader};
use super::pages::{write_pages, PageRun, MAX_BATCH_DATA_BYTES, MAX_BATCH_RUNS, PAGE_SIZE};
use crate::error::ProtocolError;

/// Why a page could not join a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the batch is full; send it and start another")]
    Full,
    #[error("page address {0:#x} is not page aligned")]
    Misaligned(u64),
    #[error("a page is {PAGE_SIZE} bytes, not {0}")]
    WrongPageSize(usize),
}

/// Data runs, zero runs and the data itself, with buffers kept across
/// [`clear`](Self::clear) so a steady stream of batches allocates nothing.
#[derive(Debug, Default, Clone)]
pub struct PageBatch {
    data_runs: Vec<PageRun>,
    zero_runs: Vec<PageRun>,
    // `data` only grows; `data_len` is how much of it is this batch's, so
    // reusing it never re-zeroes megabytes before a read overwrites them.
    data: Vec<u8>,
    data_len: usize,
}

impl PageBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.data_runs.clear();
        self.zero_runs.clear();
        self.data_len = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.data_runs.is_empty() && self.zero_runs.is_empty()
    }

    pub fn data_runs(&self) -> &[PageRun] {
        &self.data_runs
    }

    pub fn zero_runs(&self) -> &[PageRun] {
        &self.zero_runs
    }

    /// The data runs' pages, back to back.
    pub fn data(&self) -> &[u8] {
        &self.data[..self.data_len]
    }

    pub fn data_pages(&self) -> u64 {
        (self.data_len / PAGE_SIZE) as u64
    }

    pub fn zero_pages(&self) -> u64 {
        self.zero_runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// Every page with data, as (gpa, 4096 bytes), in order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let gpas = self
            .data_runs
            .iter()
            .flat_map(|r| (0..u64::from(r.pages)).map(move |i| r.gpa + i * PAGE_SIZE as u64));
        gpas.zip(self.data().chunks_exact(PAGE_SIZE))
    }

    fn check_page(gpa: u64) -> Result<(), BatchError> {
        if gpa % PAGE_SIZE as u64 != 0 {
            return Err(BatchError::Misaligned(gpa));
        }
        Ok(())
    }

    /// Appends a page to the last run if it follows it, or starts a run.
    /// Returns false when a new run would exceed the run cap.
    fn extend_runs(runs: &mut Vec<PageRun>, gpa: u64) -> bool {
        if let Some(last) = runs.last_mut() {
            if last.end() == Some(gpa) && last.pages < u32::MAX {
                last.pages += 1;
                return true;
            }
        }
        if runs.len() == MAX_BATCH_RUNS {
            return false;
        }
        runs.push(PageRun { gpa, pages: 1 });
        true
    }

    /// Copies one page in. Overlaps with pages already in the batch are
    /// caught when it is written.
    pub fn push_page(&mut self, gpa: u64, page: &[u8]) -> Result<(), BatchError> {
        Self::check_page(gpa)?;
        if page.len() != PAGE_SIZE {
            return Err(BatchError::WrongPageSize(page.len()));
        }
        if self.data_len + PAGE_SIZE > MAX_BATCH_DATA_BYTES
            || !Self::extend_runs(&mut self.data_runs, gpa)
        {
            return Err(BatchError::Full);
        }
        let end = self.data_len + PAGE_SIZE;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[self.data_len..end].copy_from_slice(page);
        self.data_len = end;
        Ok(())
    }

    /// Records an all-zero page: it costs twelve bytes at most, and nothing
    /// when it extends the previous zero run.
    pub fn push_zero(&mut self, gpa: u64) -> Result<(), BatchError> {
        Self::check_page(gpa)?;
        if !Self::extend_runs(&mut self.zero_runs, gpa) {
            return Err(BatchError::Full);
        }
        Ok(())
    }

    /// Sends the batch as one Pages frame.
    pub fn write(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        write_pages(
            w,
            &self.data_runs,
            &self.zero_runs,
            &[self.data()],
            PayloadCheck::Crc32,
        )
    }

    /// Replaces the batch with the payload of a Pages frame whose header was
    /// just read. On error the batch's contents are unspecified.
    pub fn read(&mut self, r: &mut impl Read, header: &FrameHeader) -> Result<(), ProtocolError> {
        if header.kind != FrameKind::Pages {
            return Err(ProtocolError::Unexpected {
                expected: "a Pages frame",
                got: header.kind,
            });
        }
        self.clear();
        let mut payload = PayloadReader::checked(r, header, PayloadCheck::Crc32)?;
        let data_bytes =
            super::pages::read_table_into(&mut payload, &mut self.data_runs, &mut self.zero_runs)?;
        if self.data.len() < data_bytes {
            self.data.resize(data_bytes, 0);
        }
        payload.read_into(&mut self.data[..data_bytes])?;
        payload.finish()?;
        self.data_len = data_bytes;
        Ok(())
    }
}
