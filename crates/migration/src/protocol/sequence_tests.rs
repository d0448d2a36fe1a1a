//! Whole-protocol tests over real loopback TCP: a fake source and a fake
//! destination, each on its own thread, play the sequence of the module doc.

use crate::transport::{Link, Listener};
use std::io::Write;
use std::net::Shutdown;
use std::thread;

use super::*;
use crate::error::ProtocolError;

const PAGES: usize = 400;
const MEM_BYTES: u64 = (PAGES * PAGE_SIZE) as u64;

fn offer() -> Offer {
    Offer {
        mem_bytes: MEM_BYTES,
        vcpus: 2,
        ram_ranges: vec![RamRange {
            gpa: 0,
            len: MEM_BYTES,
        }],
        tsc_khz: 2_995_200,
        cpuid: vec![0x42; 3000],
        features: vec!["irqchip".into()],
        disks: Vec::new(),
        copies_disks: false,
    }
}

/// Distinct content per page and generation; generation 0 is a zero page.
fn fill(page: &mut [u8], index: usize, generation: u32) {
    for (i, b) in page.iter_mut().enumerate() {
        *b = if generation == 0 {
            0
        } else {
            (i as u32 ^ (index as u32).wrapping_mul(2_654_435_761) ^ generation.wrapping_mul(97))
                as u8
                | 1
        };
    }
}

fn connected_pair() -> (Link, Link) {
    let listener = Listener::plain(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let source = Link::plain(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
    let (destination, _) = listener.accept().unwrap();
    source.set_nodelay(true).unwrap();
    destination.set_nodelay(true).unwrap();
    (source, destination)
}

/// The destination's reserved memory: only what the offer covers.
struct Reserved {
    offer: Offer,
    mem: Vec<u8>,
}

impl PageSink for Reserved {
    fn data_target(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        self.offer
            .covers(gpa, len as u64)
            .then(|| &mut self.mem[gpa as usize..gpa as usize + len])
    }
    fn zero_range(&mut self, gpa: u64, len: u64) -> bool {
        let ok = self.offer.covers(gpa, len);
        if ok {
            self.mem[gpa as usize..(gpa + len) as usize].fill(0);
        }
        ok
    }
}

/// Sends the pages listed, zero pages as zero runs, in batches of `per`.
fn send_round(s: &mut Link, mem: &[u8], pages: &[usize], per: usize) -> u64 {
    let mut batch = PageBatch::new();
    for chunk in pages.chunks(per) {
        batch.clear();
        for &i in chunk {
            let page = &mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let gpa = (i * PAGE_SIZE) as u64;
            if page.iter().all(|&b| b == 0) {
                batch.push_zero(gpa).unwrap();
            } else {
                batch.push_page(gpa, page).unwrap();
            }
        }
        batch.write(s).unwrap();
    }
    pages.len() as u64
}

fn source(mut s: Link, state: &[u8]) -> Vec<u8> {
    let mut scratch = Vec::new();
    write_message(&mut s, &Message::Hello(Hello::new(Role::Source))).unwrap();
    assert_eq!(
        recv_message(&mut s, &mut scratch).unwrap(),
        Message::HelloAck(HelloAck::Accepted {
            version: PROTOCOL_VERSION
        })
    );
    write_message(&mut s, &Message::Offer(offer())).unwrap();
    assert!(
        matches!(recv_message(&mut s, &mut scratch).unwrap(), Message::Accept(a) if a.reserved_bytes == MEM_BYTES)
    );

    // Round 1: every page. Every seventh page is zero; the rest go straight
    // from `mem` as one data run per non-zero stretch (the zero-copy path).
    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
    for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill(page, i, if i % 7 == 0 { 0 } else { 1 });
    }
    for first in (0..PAGES).step_by(70) {
        let (mut data_runs, mut zero_runs, mut slices) = (Vec::new(), Vec::new(), Vec::new());
        for i in first..(first + 70).min(PAGES) {
            let gpa = (i * PAGE_SIZE) as u64;
            if i % 7 == 0 {
                zero_runs.push(PageRun { gpa, pages: 1 });
            } else {
                data_runs.push(PageRun { gpa, pages: 1 });
                slices.push(&mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            }
        }
        write_pages(&mut s, &data_runs, &zero_runs, &slices, PayloadCheck::Crc32).unwrap();
    }
    write_message(
        &mut s,
        &Message::RoundEnd(RoundEnd {
            round: 1,
            pages: PAGES as u64,
        }),
    )
    .unwrap();

    // Round 2: a fifth of the pages rewritten, some of them to zero.
    let dirty: Vec<usize> = (0..PAGES).filter(|i| i % 5 == 0).collect();
    for &i in &dirty {
        fill(
            &mut mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            i,
            if i % 25 == 0 { 0 } else { 2 },
        );
    }
    let pages = send_round(&mut s, &mem, &dirty, 16);
    write_message(&mut s, &Message::RoundEnd(RoundEnd { round: 2, pages })).unwrap();

    // Blackout: the last dirty pages, then the state record.
    let last: Vec<usize> = (0..PAGES).filter(|i| i % 11 == 3).collect();
    for &i in &last {
        fill(&mut mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], i, 3);
    }
    let pages = send_round(&mut s, &mem, &last, 64);
    write_message(&mut s, &Message::RoundEnd(RoundEnd { round: 3, pages })).unwrap();
    write_state(&mut s, state).unwrap();
    let loaded = StateLoaded {
        state_len: state.len() as u64,
        state_crc: crc32fast::hash(state),
    };
    assert_eq!(
        recv_message(&mut s, &mut scratch).unwrap(),
        Message::StateLoaded(loaded)
    );
    write_message(&mut s, &Message::Commit(Commit)).unwrap();
    assert_eq!(
        recv_message(&mut s, &mut scratch).unwrap(),
        Message::Committed(Committed)
    );
    mem
}

fn destination(mut s: Link) -> (Vec<u8>, Vec<u8>, Vec<u64>) {
    let mut scratch = Vec::new();
    let Message::Hello(hello) = recv_message(&mut s, &mut scratch).unwrap() else {
        panic!("no Hello")
    };
    write_message(
        &mut s,
        &Message::HelloAck(hello.answer(VersionRange::SUPPORTED, Role::Destination)),
    )
    .unwrap();
    let Message::Offer(offer) = recv_message(&mut s, &mut scratch).unwrap() else {
        panic!("no Offer")
    };
    offer.validate().unwrap();
    // Garbage, not zeros: zero runs must really clear memory.
    let mut memory = Reserved {
        mem: vec![0xcc; offer.mem_bytes as usize],
        offer,
    };
    write_message(
        &mut s,
        &Message::Accept(Accept {
            reserved_bytes: MEM_BYTES,
        }),
    )
    .unwrap();

    let mut per_round = Vec::new();
    let mut in_round = 0;
    let mut state = Vec::new();
    loop {
        let header = read_header(&mut s).unwrap();
        match header.kind {
            FrameKind::Pages => {
                in_round += read_pages_into(&mut s, &header, PayloadCheck::Crc32, &mut memory)
                    .unwrap()
                    .pages()
            }
            FrameKind::State => {
                read_state(&mut s, &header, &mut state).unwrap();
                break;
            }
            _ => match read_message(&mut s, &header, &mut scratch).unwrap() {
                Message::RoundEnd(end) => {
                    assert_eq!(end.pages, in_round, "round {} lost pages", end.round);
                    per_round.push(in_round);
                    in_round = 0;
                }
                other => panic!("unexpected {other:?} during the rounds"),
            },
        }
    }
    let loaded = StateLoaded {
        state_len: state.len() as u64,
        state_crc: crc32fast::hash(&state),
    };
    write_message(&mut s, &Message::StateLoaded(loaded)).unwrap();
    assert_eq!(
        recv_message(&mut s, &mut scratch).unwrap(),
        Message::Commit(Commit)
    );
    write_message(&mut s, &Message::Committed(Committed)).unwrap();
    (memory.mem, state, per_round)
}

#[test]
fn full_precopy_sequence_over_tcp_moves_every_page_intact() {
    let (src, dst) = connected_pair();
    let state: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (source_mem, (dest_mem, dest_state, per_round)) = thread::scope(|scope| {
        let sent = scope.spawn(|| source(src, &state));
        let received = scope.spawn(|| destination(dst));
        (sent.join().unwrap(), received.join().unwrap())
    });
    assert_eq!(per_round, vec![400, 80, 37]);
    assert_eq!(dest_state, state);
    for (i, (want, got)) in source_mem
        .chunks(PAGE_SIZE)
        .zip(dest_mem.chunks(PAGE_SIZE))
        .enumerate()
    {
        assert!(want == got, "page {i} differs");
    }
    // The content really was distinct, zero and non-zero alike.
    assert!(source_mem[..PAGE_SIZE].iter().all(|&b| b == 0));
    assert_ne!(
        source_mem[PAGE_SIZE..2 * PAGE_SIZE],
        source_mem[2 * PAGE_SIZE..3 * PAGE_SIZE]
    );
}

#[test]
fn refused_offer_ends_before_any_page_moves() {
    let (mut src, mut dst) = connected_pair();
    let destination = thread::spawn(move || {
        let mut scratch = Vec::new();
        let Message::Hello(hello) = recv_message(&mut dst, &mut scratch).unwrap() else {
            panic!()
        };
        write_message(
            &mut dst,
            &Message::HelloAck(hello.answer(VersionRange::SUPPORTED, Role::Destination)),
        )
        .unwrap();
        let Message::Offer(offer) = recv_message(&mut dst, &mut scratch).unwrap() else {
            panic!()
        };
        let reason = format!("{} vCPUs asked, 1 available", offer.vcpus);
        write_message(&mut dst, &Message::Refuse(Refuse { reason })).unwrap();
        // The source must hang up rather than send pages.
        assert!(matches!(
            read_header(&mut dst),
            Err(ProtocolError::PeerClosed)
        ));
    });
    let mut scratch = Vec::new();
    write_message(&mut src, &Message::Hello(Hello::new(Role::Source))).unwrap();
    assert!(matches!(
        recv_message(&mut src, &mut scratch).unwrap(),
        Message::HelloAck(HelloAck::Accepted { .. })
    ));
    write_message(&mut src, &Message::Offer(offer())).unwrap();
    let reply = recv_message(&mut src, &mut scratch).unwrap();
    assert_eq!(
        reply,
        Message::Refuse(Refuse {
            reason: "2 vCPUs asked, 1 available".into()
        })
    );
    drop(src);
    destination.join().unwrap();
}

#[test]
fn source_vanishing_mid_batch_is_a_retryable_truncation() {
    let (mut src, mut dst) = connected_pair();
    let mut batch = PageBatch::new();
    for i in 0..32u64 {
        batch
            .push_page(i * 4096, &[i as u8 + 1; PAGE_SIZE])
            .unwrap();
    }
    let mut wire = Vec::new();
    batch.write(&mut wire).unwrap();
    src.write_all(&wire[..wire.len() / 2]).unwrap();
    src.shutdown(Shutdown::Both).unwrap();
    drop(src);

    let header = read_header(&mut dst).unwrap();
    let mut memory = Reserved {
        offer: offer(),
        mem: vec![0; MEM_BYTES as usize],
    };
    let err = read_pages_into(&mut dst, &header, PayloadCheck::Crc32, &mut memory).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::TruncatedPayload {
                kind: FrameKind::Pages,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
}
