//! Tests of the framing: round trips, and every way a stream can be bad.

use std::io::{self, Cursor, Read, Write};

use super::*;
use crate::protocol::{read_message, write_message, Message, Offer, PageBatch, RamRange, RoundEnd};

/// A header with any field values and a correct header checksum.
fn raw_header(
    kind: u16,
    flags: u16,
    reserved: u16,
    len: u32,
    payload_crc: u32,
) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&FRAME_MAGIC);
    b[2..4].copy_from_slice(&kind.to_le_bytes());
    b[4..6].copy_from_slice(&flags.to_le_bytes());
    b[6..8].copy_from_slice(&reserved.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32fast::hash(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads one frame of any kind the way a receiver would.
pub(crate) fn read_any(r: &mut impl Read) -> Result<(), ProtocolError> {
    let header = read_header(r)?;
    match header.kind {
        FrameKind::Pages => PageBatch::new().read(r, &header),
        FrameKind::State => read_state(r, &header, &mut Vec::new()),
        _ => read_message(r, &header, &mut Vec::new()).map(drop),
    }
}

/// One frame of each shape: a control message, a page batch, a state record.
fn sample_frames() -> Vec<Vec<u8>> {
    let mut control = Vec::new();
    let offer = Offer {
        mem_bytes: 1 << 20,
        vcpus: 2,
        ram_ranges: vec![RamRange {
            gpa: 0,
            len: 1 << 20,
        }],
        tsc_khz: 2_500_000,
        cpuid: vec![7; 40],
        features: vec!["pit2".into()],
        disks: Vec::new(),
        copies_disks: false,
    };
    write_message(&mut control, &Message::Offer(offer)).unwrap();

    let mut pages = Vec::new();
    let mut batch = PageBatch::new();
    batch.push_page(0x1000, &[0xa5; 4096]).unwrap();
    batch.push_page(0x2000, &[0x5a; 4096]).unwrap();
    batch.push_zero(0x8000).unwrap();
    batch.write(&mut pages).unwrap();

    let mut state = Vec::new();
    write_state(
        &mut state,
        &(0..300u32).map(|i| i as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    vec![control, pages, state]
}

#[test]
fn header_round_trips_for_every_kind() {
    for kind in FrameKind::ALL {
        let h = FrameHeader {
            kind,
            flags: 0,
            len: 1234,
            payload_crc: 0xdead_beef,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(FrameKind::from_u16(kind as u16), Some(kind));
    }
}

#[test]
fn kinds_have_stable_wire_numbers() {
    let numbers: Vec<u16> = FrameKind::ALL.iter().map(|k| *k as u16).collect();
    assert_eq!(numbers, (1..=33).collect::<Vec<u16>>());
}

#[test]
fn raw_frame_round_trips() {
    let mut wire = Vec::new();
    write_frame(&mut wire, FrameKind::Abort, b"hello").unwrap();
    write_frame(&mut wire, FrameKind::Commit, b"").unwrap();
    assert_eq!(wire.len(), 2 * HEADER_LEN + 5);
    let mut r = Cursor::new(wire);
    let mut buf = Vec::new();
    let h = read_header(&mut r).unwrap();
    assert_eq!((h.kind, h.len), (FrameKind::Abort, 5));
    read_payload(&mut r, &h, &mut buf).unwrap();
    assert_eq!(buf, b"hello");
    let h = read_header(&mut r).unwrap();
    read_payload(&mut r, &h, &mut buf).unwrap();
    assert_eq!((h.kind, buf.len()), (FrameKind::Commit, 0));
    assert!(matches!(
        read_header(&mut r),
        Err(ProtocolError::PeerClosed)
    ));
}

#[test]
fn state_round_trips() {
    let state: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut wire = Vec::new();
    write_state(&mut wire, &state).unwrap();
    let mut r = Cursor::new(wire);
    let h = read_header(&mut r).unwrap();
    let mut got = Vec::new();
    read_state(&mut r, &h, &mut got).unwrap();
    assert_eq!(got, state);
}

#[test]
fn every_flipped_byte_is_caught_as_fatal() {
    for frame in sample_frames() {
        read_any(&mut Cursor::new(&frame)).expect("the pristine frame reads");
        for i in 0..frame.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[i] ^= mask;
                let err = read_any(&mut Cursor::new(&bad)).expect_err("corruption went unnoticed");
                assert!(
                    !err.is_retryable(),
                    "byte {i} ^ {mask:#x}: {err} treated as retryable"
                );
            }
        }
    }
}

#[test]
fn every_truncation_is_caught_as_peer_closed() {
    for frame in sample_frames() {
        for cut in 0..frame.len() {
            let err =
                read_any(&mut Cursor::new(&frame[..cut])).expect_err("truncation went unnoticed");
            assert!(
                err.is_peer_closed() && err.is_retryable(),
                "cut at {cut}: {err}"
            );
            if cut == 0 {
                assert!(matches!(err, ProtocolError::PeerClosed));
            }
        }
    }
}

/// Yields the header, then fails the test if anyone asks for the payload.
struct HeaderOnly(Cursor<[u8; HEADER_LEN]>);

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        assert!(
            n > 0 || buf.is_empty(),
            "the reader went past an oversize header"
        );
        Ok(n)
    }
}

#[test]
fn oversize_lengths_are_refused_before_reading_or_allocating() {
    for kind in FrameKind::ALL {
        let mut r = HeaderOnly(Cursor::new(raw_header(kind as u16, 0, 0, u32::MAX, 0)));
        let err = read_header(&mut r).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Oversize { kind: k, len, .. } if k == kind && len == u64::from(u32::MAX)),
            "{kind}: {err}"
        );
        assert!(!err.is_retryable());
        // One past the cap is refused, the cap itself is not.
        let cap = kind.max_payload();
        assert!(FrameHeader::decode(&raw_header(kind as u16, 0, 0, cap + 1, 0)).is_err());
        assert!(FrameHeader::decode(&raw_header(kind as u16, 0, 0, cap, 0)).is_ok());
    }
}

#[test]
fn oversize_payloads_are_not_sent() {
    let big = vec![0u8; MAX_CONTROL_PAYLOAD as usize + 1];
    let mut wire = Vec::new();
    let err = write_frame(&mut wire, FrameKind::Abort, &big).unwrap_err();
    assert!(matches!(err, ProtocolError::Oversize { .. }));
    assert!(wire.is_empty(), "nothing may reach the wire");
}

#[test]
fn unknown_kinds_are_refused() {
    for raw in [0u16, 34, 0x00ff, 0xffff] {
        let err = read_header(&mut Cursor::new(raw_header(raw, 0, 0, 0, 0))).unwrap_err();
        assert!(
            matches!(err, ProtocolError::UnknownKind(k) if k == raw),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
}

#[test]
fn unknown_flags_and_reserved_bits_are_refused() {
    let err = read_header(&mut Cursor::new(raw_header(1, 0x0004, 0, 0, 0))).unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnknownFlags { flags: 4, .. }),
        "{err}"
    );
    let err = read_header(&mut Cursor::new(raw_header(1, 0, 1, 0, 0))).unwrap_err();
    assert!(matches!(err, ProtocolError::ReservedNonZero(1)), "{err}");
}

#[test]
fn a_wrong_peer_is_named_as_such() {
    let err = read_header(&mut Cursor::new(b"HTTP/1.1 200 OK\r\n\r\nabc".to_vec())).unwrap_err();
    assert!(
        matches!(err, ProtocolError::BadMagic { found } if found == *b"HT"),
        "{err}"
    );
    assert!(err.to_string().contains("does not speak"));
}

#[test]
fn control_reader_refuses_data_frames() {
    let mut wire = Vec::new();
    write_state(&mut wire, b"state").unwrap();
    let mut r = Cursor::new(wire);
    let h = read_header(&mut r).unwrap();
    let err = read_message(&mut r, &h, &mut Vec::new()).unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::Unexpected {
            got: FrameKind::State,
            ..
        }
    ));
}

/// Accepts at most 3 bytes per call and reports Interrupted every other
/// call, as a slow socket might.
struct Dribble {
    out: Vec<u8>,
    calls: usize,
}

impl Write for Dribble {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 2 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(3);
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands out one byte per read.
struct OneByte<'a>(&'a [u8]);

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((b, rest)), Some(slot)) => {
                *slot = *b;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn short_writes_and_short_reads_are_looped_over() {
    let mut w = Dribble {
        out: Vec::new(),
        calls: 0,
    };
    let msg = Message::RoundEnd(RoundEnd {
        round: 3,
        pages: 77,
    });
    write_message(&mut w, &msg).unwrap();
    let mut batch = PageBatch::new();
    batch.push_page(0, &[9; 4096]).unwrap();
    batch.write(&mut w).unwrap();

    let mut r = OneByte(&w.out);
    let h = read_header(&mut r).unwrap();
    assert_eq!(read_message(&mut r, &h, &mut Vec::new()).unwrap(), msg);
    let h = read_header(&mut r).unwrap();
    let mut got = PageBatch::new();
    got.read(&mut r, &h).unwrap();
    assert_eq!(got.data(), &[9; 4096][..]);
}

/// The link-checked flag belongs to Pages frames only.
#[test]
fn the_link_checked_flag_on_a_control_frame_is_refused() {
    let mut wire = Vec::new();
    crate::protocol::write_frame_checked(
        &mut wire,
        FrameKind::RoundEnd,
        &[&[0u8; 4]],
        crate::protocol::PayloadCheck::ByLink,
    )
    .unwrap();
    // The writer keeps the crc on anything but Pages.
    let h = read_header(&mut std::io::Cursor::new(&wire)).unwrap();
    assert_eq!(h.flags, 0);
    let mut b: [u8; HEADER_LEN] = wire[..HEADER_LEN].try_into().unwrap();
    b[4] = crate::protocol::FLAG_LINK_CHECKED as u8;
    let crc = crc32fast::hash(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    let err = FrameHeader::decode(&b).unwrap_err();
    assert!(
        matches!(err, ProtocolError::UnknownFlags { flags: 1, .. }),
        "{err}"
    );
}
