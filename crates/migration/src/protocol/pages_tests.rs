//! Tests of page batches: round trips through both readers, and validation.

use std::io::Cursor;

use super::*;
use crate::protocol::{read_header, BatchError, PageBatch};

/// Flat memory starting at gpa 0, as a destination's reserved RAM.
pub(crate) struct FlatMemory(pub Vec<u8>);

impl PageSink for FlatMemory {
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(gpa).ok()?;
        self.0.get_mut(start..start.checked_add(len)?)
    }
    fn zero_range(&mut self, gpa: u64, len: u64) -> bool {
        let (Ok(start), Ok(len)) = (usize::try_from(gpa), usize::try_from(len)) else {
            return false;
        };
        match start
            .checked_add(len)
            .and_then(|end| self.0.get_mut(start..end))
        {
            Some(range) => {
                range.fill(0);
                true
            }
            None => false,
        }
    }
}

fn page(tag: u32) -> Vec<u8> {
    (0..PAGE_SIZE as u32)
        .map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(0x9e37)) as u8)
        .collect()
}

fn run(gpa: u64, pages: u32) -> PageRun {
    PageRun { gpa, pages }
}

#[test]
fn multi_run_batch_with_zero_runs_round_trips_into_a_sink() {
    let data_runs = [run(0x0000, 2), run(0x5000, 1), run(0x10000, 3)];
    let zero_runs = [run(0x2000, 3), run(0x20000, 16)];
    let pages: Vec<Vec<u8>> = (0..6).map(page).collect();
    let slices: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let mut wire = Vec::new();
    write_pages(
        &mut wire,
        &data_runs,
        &zero_runs,
        &slices,
        PayloadCheck::Crc32,
    )
    .unwrap();
    // Zero pages cost only their run entries.
    assert_eq!(wire.len(), 20 + 8 + 5 * 12 + 6 * PAGE_SIZE);

    let mut mem = FlatMemory(vec![0xee; 0x40000]);
    let mut r = Cursor::new(wire);
    let h = read_header(&mut r).unwrap();
    let summary = read_pages_into(&mut r, &h, PayloadCheck::Crc32, &mut mem).unwrap();
    assert_eq!(
        summary,
        PagesSummary {
            data_pages: 6,
            zero_pages: 19
        }
    );
    let at = |gpa: usize| &mem.0[gpa..gpa + PAGE_SIZE];
    for (i, gpa) in [0x0000, 0x1000, 0x5000, 0x10000, 0x11000, 0x12000]
        .into_iter()
        .enumerate()
    {
        assert_eq!(at(gpa), pages[i].as_slice(), "page {i} at {gpa:#x}");
    }
    assert!(mem.0[0x2000..0x5000].iter().all(|&b| b == 0));
    assert!(mem.0[0x20000..0x30000].iter().all(|&b| b == 0));
    assert!(
        mem.0[0x6000..0x10000].iter().all(|&b| b == 0xee),
        "untouched memory stays"
    );
}

#[test]
fn batch_builder_coalesces_and_round_trips() {
    let mut batch = PageBatch::new();
    for i in 0..10u64 {
        batch
            .push_page(0x100000 + i * 4096, &page(i as u32))
            .unwrap();
    }
    batch.push_page(0x300000, &page(99)).unwrap();
    for i in 0..100u64 {
        batch.push_zero(0x400000 + i * 4096).unwrap();
    }
    assert_eq!(batch.data_runs(), &[run(0x100000, 10), run(0x300000, 1)]);
    assert_eq!(batch.zero_runs(), &[run(0x400000, 100)]);
    let mut wire = Vec::new();
    batch.write(&mut wire).unwrap();

    let mut got = PageBatch::new();
    got.push_page(0, &page(1234)).unwrap(); // stale content must vanish
    let mut r = Cursor::new(wire);
    let h = read_header(&mut r).unwrap();
    got.read(&mut r, &h).unwrap();
    assert_eq!(got.data_runs(), batch.data_runs());
    assert_eq!(got.zero_runs(), batch.zero_runs());
    assert_eq!((got.data_pages(), got.zero_pages()), (11, 100));
    let pages: Vec<(u64, &[u8])> = got.pages().collect();
    assert_eq!(pages.len(), 11);
    assert_eq!(pages[10], (0x300000, page(99).as_slice()));
    assert_eq!(pages[3], (0x103000, page(3).as_slice()));
}

#[test]
fn reused_batch_reads_a_smaller_batch_after_a_larger_one() {
    let mut wire = Vec::new();
    let mut big = PageBatch::new();
    for i in 0..64u64 {
        big.push_page(i * 4096, &page(i as u32)).unwrap();
    }
    big.write(&mut wire).unwrap();
    let mut small = PageBatch::new();
    small.push_page(0x9000, &page(7)).unwrap();
    small.write(&mut wire).unwrap();
    PageBatch::new().write(&mut wire).unwrap(); // an empty batch is legal

    let mut r = Cursor::new(wire);
    let mut got = PageBatch::new();
    for want in [&big, &small, &PageBatch::new()] {
        let h = read_header(&mut r).unwrap();
        got.read(&mut r, &h).unwrap();
        assert_eq!(got.data(), want.data());
        assert_eq!(got.data_runs(), want.data_runs());
    }
}

#[test]
fn batch_fills_up_at_the_data_cap() {
    let mut batch = PageBatch::new();
    let p = page(1);
    for i in 0..MAX_BATCH_DATA_PAGES as u64 {
        batch.push_page(i * 4096, &p).unwrap();
    }
    assert_eq!(batch.push_page(1 << 40, &p), Err(BatchError::Full));
    assert_eq!(batch.push_page(3, &p), Err(BatchError::Misaligned(3)));
    assert_eq!(batch.push_zero(5), Err(BatchError::Misaligned(5)));
    assert_eq!(
        PageBatch::new().push_page(0, &p[..100]),
        Err(BatchError::WrongPageSize(100))
    );
    let mut wire = Vec::new();
    batch.write(&mut wire).unwrap();
    let h = read_header(&mut Cursor::new(&wire)).unwrap();
    assert!(h.len <= MAX_PAGES_PAYLOAD as u32);
}

#[test]
fn batch_runs_are_capped() {
    let mut batch = PageBatch::new();
    // Every other page: no two coalesce.
    for i in 0..MAX_BATCH_RUNS as u64 {
        batch.push_zero(i * 2 * 4096).unwrap();
    }
    assert_eq!(batch.push_zero(1 << 40), Err(BatchError::Full));
    batch
        .push_zero((MAX_BATCH_RUNS as u64 * 2 - 1) * 4096)
        .unwrap(); // still coalesces
}

#[test]
fn invalid_batches_are_not_sent() {
    let p = page(0);
    let cases: Vec<(Vec<PageRun>, Vec<PageRun>, usize)> = vec![
        (vec![run(0x1001, 1)], vec![], 1),                 // unaligned
        (vec![run(0x1000, 0)], vec![], 0),                 // empty run
        (vec![run(u64::MAX - 4095, 2)], vec![], 2),        // wraps
        (vec![run(0x1000, 2)], vec![run(0x2000, 1)], 2),   // data and zero overlap
        (vec![run(0x1000, 2), run(0x0000, 2)], vec![], 4), // data runs overlap
        (vec![run(0x1000, 2)], vec![], 1),                 // too little data
        (vec![run(0x1000, 1)], vec![], 2),                 // too much data
        (vec![run(0, MAX_BATCH_DATA_PAGES as u32 + 1)], vec![], 0), // over the data cap
    ];
    for (data_runs, zero_runs, pages) in cases {
        let slices: Vec<&[u8]> = (0..pages).map(|_| p.as_slice()).collect();
        let mut wire = Vec::new();
        let err = write_pages(
            &mut wire,
            &data_runs,
            &zero_runs,
            &slices,
            PayloadCheck::Crc32,
        )
        .unwrap_err();
        assert!(
            matches!(err, ProtocolError::InvalidBatch(_)),
            "{data_runs:?} {zero_runs:?}: {err}"
        );
        assert!(wire.is_empty());
    }
}

/// Builds a Pages frame with a hand-made payload and a valid checksum.
fn forged(payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    crate::protocol::write_frame(&mut wire, FrameKind::Pages, payload).unwrap();
    wire
}

fn table(data_runs: &[PageRun], zero_runs: &[PageRun]) -> Vec<u8> {
    encode_table(data_runs, zero_runs)
}

#[test]
fn forged_batches_are_refused_as_malformed() {
    let mut too_many = Vec::new();
    too_many.extend_from_slice(&(MAX_BATCH_RUNS as u32 + 1).to_le_bytes());
    too_many.extend_from_slice(&0u32.to_le_bytes());
    let mut missing_data = table(&[run(0, 2)], &[]);
    missing_data.extend_from_slice(&page(0));
    let mut extra_data = table(&[run(0, 1)], &[]);
    extra_data.extend_from_slice(&page(0));
    extra_data.push(0);
    let cases = [
        vec![1, 2, 3], // shorter than the counts
        too_many,      // counts over the cap
        table(&[run(0x10, 1)], &[]),
        table(&[], &[run(0x1000, 2), run(0x0000, 2)]),
        missing_data,
        extra_data,
    ];
    for payload in cases {
        let wire = forged(&payload);
        let mut r = Cursor::new(&wire);
        let h = read_header(&mut r).unwrap();
        let err = read_pages_into(
            &mut r,
            &h,
            PayloadCheck::Crc32,
            &mut FlatMemory(vec![0; 0x10000]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Malformed {
                    kind: FrameKind::Pages,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
}

#[test]
fn pages_outside_the_sink_are_rejected() {
    let mut batch = PageBatch::new();
    batch.push_page(0x10000, &page(0)).unwrap();
    let mut wire = Vec::new();
    batch.write(&mut wire).unwrap();
    let mut r = Cursor::new(&wire);
    let h = read_header(&mut r).unwrap();
    let err = read_pages_into(
        &mut r,
        &h,
        PayloadCheck::Crc32,
        &mut FlatMemory(vec![0; 0x10000]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::PageRangeRejected {
                gpa: 0x10000,
                len: 4096
            }
        ),
        "{err}"
    );

    let mut batch = PageBatch::new();
    batch.push_zero(0x10000).unwrap();
    let mut wire = Vec::new();
    batch.write(&mut wire).unwrap();
    let mut r = Cursor::new(&wire);
    let h = read_header(&mut r).unwrap();
    let err = read_pages_into(
        &mut r,
        &h,
        PayloadCheck::Crc32,
        &mut FlatMemory(vec![0; 0x10000]),
    )
    .unwrap_err();
    assert!(
        matches!(err, ProtocolError::PageRangeRejected { gpa: 0x10000, .. }),
        "{err}"
    );
}

/// A Pages frame on a TLS link leaves its crc out; the frame says so, and
/// only a reader whose link authenticates takes it.
#[test]
fn a_batch_without_its_crc_is_taken_only_from_an_authenticating_link() {
    let data_runs = [run(0x1000, 2)];
    let pages: Vec<Vec<u8>> = (0..2).map(page).collect();
    let slices: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let mut wire = Vec::new();
    write_pages(&mut wire, &data_runs, &[], &slices, PayloadCheck::ByLink).unwrap();
    let h = read_header(&mut Cursor::new(&wire)).unwrap();
    assert_eq!(h.flags, crate::protocol::FLAG_LINK_CHECKED);
    assert_eq!(h.payload_crc, 0);

    let mut mem = FlatMemory(vec![0; 0x4000]);
    let mut r = Cursor::new(&wire);
    let h = read_header(&mut r).unwrap();
    let err = read_pages_into(&mut r, &h, PayloadCheck::Crc32, &mut mem).unwrap_err();
    assert!(matches!(err, ProtocolError::UncheckedOnPlainLink), "{err}");
    assert!(
        mem.0.iter().all(|&b| b == 0),
        "nothing lands from a refused frame"
    );

    let mut r = Cursor::new(&wire);
    let h = read_header(&mut r).unwrap();
    read_pages_into(&mut r, &h, PayloadCheck::ByLink, &mut mem).unwrap();
    assert_eq!(&mem.0[0x1000..0x2000], pages[0].as_slice());
    assert_eq!(&mem.0[0x2000..0x3000], pages[1].as_slice());

    // An authenticating link still takes the checked form from an older peer.
    let mut wire = Vec::new();
    write_pages(&mut wire, &data_runs, &[], &slices, PayloadCheck::Crc32).unwrap();
    let mut r = Cursor::new(&wire);
    let h = read_header(&mut r).unwrap();
    read_pages_into(&mut r, &h, PayloadCheck::ByLink, &mut mem).unwrap();
}

#[test]
fn only_a_tls_link_at_v12_leaves_the_crc_out() {
    use crate::protocol::LINK_CHECKED_PAGES_VERSION as V12;
    assert_eq!(PayloadCheck::for_link(true, V12), PayloadCheck::ByLink);
    assert_eq!(PayloadCheck::for_link(true, V12 - 1), PayloadCheck::Crc32);
    assert_eq!(PayloadCheck::for_link(false, V12), PayloadCheck::Crc32);
}
