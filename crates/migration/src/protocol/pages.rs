//! Page batches: the Pages frame payload that carries guest memory, as runs
//! of pages with data plus runs of all-zero pages that cost no bandwidth.
//!
//! ```text
//! u32 data run count n      u32 zero run count z
//! n × { u64 gpa, u32 pages }   runs whose data follows
//! z × { u64 gpa, u32 pages }   runs the destination zero-fills
//! Σ(data pages) × 4096 bytes   page data, in data-run order
//! ```
//!
//! Every run is page aligned, non-empty and does not wrap the address space;
//! no two runs of a batch overlap, so the order in which the destination
//! applies them cannot matter. Whether a run lies inside the VM's memory is
//! for the destination to check against what it reserved ([`PageSink`]).
//!
//! The writer checksums the page data before sending it, so the slices it is
//! given must not change meanwhile. Rust already demands that of a `&[u8]`;
//! a source that reads live guest memory copies it into a buffer (or pauses
//! the vCPUs) first, and a page the guest rewrites after the copy is dirty
//! and goes again in a later round.

use std::io::{Read, Write};

use super::frame::{write_frame_checked, FrameHeader, FrameKind, PayloadCheck, PayloadReader};
use crate::error::ProtocolError;

pub const PAGE_SIZE: usize = 4096;
/// Page data per batch: large enough for big socket writes, small enough
/// for a bounded, reusable receive buffer.
pub const MAX_BATCH_DATA_BYTES: usize = 8 << 20;
pub const MAX_BATCH_DATA_PAGES: usize = MAX_BATCH_DATA_BYTES / PAGE_SIZE;
/// Runs per list (data runs, zero runs) in one batch.
pub const MAX_BATCH_RUNS: usize = 2048;

const COUNTS_LEN: usize = 8;
const RUN_LEN: usize = 12;
pub(crate) const MAX_PAGES_PAYLOAD: usize =
    COUNTS_LEN + 2 * MAX_BATCH_RUNS * RUN_LEN + MAX_BATCH_DATA_BYTES;

/// `pages` consecutive guest pages starting at guest-physical `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub gpa: u64,
    pub pages: u32,
}

impl PageRun {
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    /// One past the last byte, or None if the run wraps the address space.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.bytes())
    }
}

/// Checks both run lists; returns the number of data bytes they call for.
fn validate_runs(data_runs: &[PageRun], zero_runs: &[PageRun]) -> Result<usize, String> {
    if data_runs.len() > MAX_BATCH_RUNS || zero_runs.len() > MAX_BATCH_RUNS {
        return Err(format!(
            "{} data runs and {} zero runs, over the {MAX_BATCH_RUNS} per list",
            data_runs.len(),
            zero_runs.len()
        ));
    }
    let mut spans = Vec::with_capacity(data_runs.len() + zero_runs.len());
    for run in data_runs.iter().chain(zero_runs) {
        if run.pages == 0 {
            return Err(format!("empty run at {:#x}", run.gpa));
        }
        if run.gpa % PAGE_SIZE as u64 != 0 {
            return Err(format!("run at {:#x} is not page aligned", run.gpa));
        }
        let end = run.end().ok_or_else(|| {
            format!(
                "run at {:#x} of {} pages wraps the address space",
                run.gpa, run.pages
            )
        })?;
        spans.push((run.gpa, end));
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[0].1 > w[1].0) {
        return Err(format!("runs at {:#x} and {:#x} overlap", w[0].0, w[1].0));
    }
    let data_bytes: u64 = data_runs.iter().map(PageRun::bytes).sum();
    if data_bytes > MAX_BATCH_DATA_BYTES as u64 {
        return Err(format!(
            "{data_bytes} bytes of page data, over the {MAX_BATCH_DATA_BYTES}-byte batch cap"
        ));
    }
    Ok(data_bytes as usize)
}

fn encode_table(data_runs: &[PageRun], zero_runs: &[PageRun]) -> Vec<u8> {
    let mut table = Vec::with_capacity(COUNTS_LEN + (data_runs.len() + zero_runs.len()) * RUN_LEN);
    table.extend_from_slice(&(data_runs.len() as u32).to_le_bytes());
    table.extend_from_slice(&(zero_runs.len() as u32).to_le_bytes());
    for run in data_runs.iter().chain(zero_runs) {
        table.extend_from_slice(&run.gpa.to_le_bytes());
        table.extend_from_slice(&run.pages.to_le_bytes());
    }
    table
}

/// Sends one batch: the run table, then `data` (whose concatenation is the
/// data runs' pages, in order) straight from the caller's slices; `check`
/// is what the link allows (`PayloadCheck::for_link`).
pub fn write_pages(
    w: &mut impl Write,
    data_runs: &[PageRun],
    zero_runs: &[PageRun],
    data: &[&[u8]],
    check: PayloadCheck,
) -> Result<(), ProtocolError> {
    let data_bytes = validate_runs(data_runs, zero_runs).map_err(ProtocolError::InvalidBatch)?;
    let given: usize = data.iter().map(|d| d.len()).sum();
    if given != data_bytes {
        return Err(ProtocolError::InvalidBatch(format!(
            "runs call for {data_bytes} bytes of page data, {given} given"
        )));
    }
    let table = encode_table(data_runs, zero_runs);
    let mut parts = Vec::with_capacity(data.len() + 1);
    parts.push(table.as_slice());
    parts.extend_from_slice(data);
    write_frame_checked(w, FrameKind::Pages, &parts, check)
}

/// Reads and validates the run table of a Pages frame; returns how many
/// data bytes follow it.
pub(crate) fn read_table_into<R: Read>(
    payload: &mut PayloadReader<'_, R>,
    data_runs: &mut Vec<PageRun>,
    zero_runs: &mut Vec<PageRun>,
) -> Result<usize, ProtocolError> {
    let mut counts = [0u8; COUNTS_LEN];
    payload.read_into(&mut counts)?;
    let n = u32::from_le_bytes([counts[0], counts[1], counts[2], counts[3]]) as usize;
    let z = u32::from_le_bytes([counts[4], counts[5], counts[6], counts[7]]) as usize;
    // Bound the counts before sizing anything by them.
    if n > MAX_BATCH_RUNS || z > MAX_BATCH_RUNS {
        return Err(payload.malformed(format!(
            "{n} data runs and {z} zero runs, over {MAX_BATCH_RUNS} per list"
        )));
    }
    let mut table = vec![0u8; (n + z) * RUN_LEN];
    payload.read_into(&mut table)?;
    let runs = table.chunks_exact(RUN_LEN).map(|c| PageRun {
        gpa: u64::from_le_bytes(c[0..8].try_into().expect("8-byte slice")),
        pages: u32::from_le_bytes(c[8..12].try_into().expect("4-byte slice")),
    });
    data_runs.clear();
    zero_runs.clear();
    for (i, run) in runs.enumerate() {
        if i < n {
            data_runs.push(run)
        } else {
            zero_runs.push(run)
        }
    }
    let data_bytes =
        validate_runs(data_runs, zero_runs).map_err(|reason| payload.malformed(reason))?;
    if data_bytes as u64 != payload.remaining() {
        return Err(payload.malformed(format!(
            "runs call for {data_bytes} bytes of page data, the frame holds {}",
            payload.remaining()
        )));
    }
    Ok(data_bytes)
}

fn expect_pages(header: &FrameHeader) -> Result<(), ProtocolError> {
    if header.kind != FrameKind::Pages {
        return Err(ProtocolError::Unexpected {
            expected: "a Pages frame",
            got: header.kind,
        });
    }
    Ok(())
}

/// Where a receiver puts pages: normally the destination's reserved guest
/// memory, which nothing runs on yet.
pub trait PageSink {
    /// The `len` bytes of memory at `gpa` that page data is read into, or
    /// None if that range is not memory the destination holds.
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]>;
    /// Makes `len` bytes at `gpa` read as zero; false if the range is not
    /// memory the destination holds.
    fn zero_range(&mut self, gpa: u64, len: u64) -> bool;
}

/// How many pages one batch brought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagesSummary {
    pub data_pages: u64,
    pub zero_pages: u64,
}

impl PagesSummary {
    pub fn pages(&self) -> u64 {
        self.data_pages + self.zero_pages
    }
}

/// Reads the payload of a Pages frame whose header was just read, with the
/// page data going straight into `sink`'s memory (no intermediate copy).
///
/// The checksum can only be verified after the data has landed, so on any
/// error the sink may hold part of a bad batch: the migration then aborts
/// and the destination discards all of its memory, as it must anyway.
/// Zero runs are applied only once the checksum has passed. `accepted` is
/// what the link allows (`PayloadCheck::accepted_on`).
pub fn read_pages_into(
    r: &mut impl Read,
    header: &FrameHeader,
    accepted: PayloadCheck,
    sink: &mut impl PageSink,
) -> Result<PagesSummary, ProtocolError> {
    expect_pages(header)?;
    let mut payload = PayloadReader::checked(r, header, accepted)?;
    let (mut data_runs, mut zero_runs) = (Vec::new(), Vec::new());
    read_table_into(&mut payload, &mut data_runs, &mut zero_runs)?;
    for run in &data_runs {
        let len = run.bytes() as usize; // <= the batch data cap
        let target = sink
            .data_target(run.gpa, len)
            .filter(|t| t.len() == len)
            .ok_or(ProtocolError::PageRangeRejected {
                gpa: run.gpa,
                len: run.bytes(),
            })?;
        payload.read_into(target)?;
    }
    payload.finish()?;
    for run in &zero_runs {
        if !sink.zero_range(run.gpa, run.bytes()) {
            return Err(ProtocolError::PageRangeRejected {
                gpa: run.gpa,
                len: run.bytes(),
            });
        }
    }
    Ok(PagesSummary {
        data_pages: data_runs.iter().map(|r| u64::from(r.pages)).sum(),
        zero_pages: zero_runs.iter().map(|r| u64::from(r.pages)).sum(),
    })
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
