//! Tests of the control messages: round trips and the checks they carry.

use std::io::Cursor;

use super::*;
use crate::protocol::{write_frame, PROTOCOL_VERSION};

fn offer() -> Offer {
    Offer {
        mem_bytes: 3 << 20,
        vcpus: 2,
        ram_ranges: vec![
            RamRange {
                gpa: 0,
                len: 1 << 20,
            },
            RamRange {
                gpa: 4 << 20,
                len: 2 << 20,
            },
        ],
        tsc_khz: 2_995_200,
        cpuid: (0..75 * 40).map(|i| i as u8).collect(),
        features: vec!["irqchip".into(), "pit2".into(), "xsave".into()],
        disks: Vec::new(),
        copies_disks: false,
    }
}

fn every_message() -> Vec<Message> {
    vec![
        Message::Hello(Hello::new(Role::Source)),
        Message::HelloAck(HelloAck::Accepted { version: 1 }),
        Message::HelloAck(HelloAck::Refused {
            reason: "no common protocol version".into(),
        }),
        Message::Offer(offer()),
        Message::Accept(Accept {
            reserved_bytes: 3 << 20,
        }),
        Message::Refuse(Refuse {
            reason: "only 1 vCPU here".into(),
        }),
        Message::RoundEnd(RoundEnd {
            round: 4,
            pages: 262_144,
        }),
        Message::StateLoaded(StateLoaded {
            state_len: 123_456,
            state_crc: 0xfeed_f00d,
        }),
        Message::Commit(Commit),
        Message::Committed(Committed),
        Message::Abort(Abort {
            reason: "operator cancelled".into(),
        }),
        Message::Resumed(Resumed {
            guest_stall_us: Some(4200),
            first_seq: None,
        }),
        Message::PostcopyPrepare(PostcopyPrepare { session: 77 }),
        Message::Join(Join { session: 77 }),
        Message::PostcopyReady(PostcopyReady),
        Message::PostcopyBegin(PostcopyBegin {
            pages: 65,
            words: vec![u64::MAX, 1, 0],
        }),
        Message::PageRequest(PageRequest {
            gpa: 0x10_0000,
            pages: 1,
        }),
        Message::PostcopyComplete(PostcopyComplete {
            pages: 65,
            requested_pages: 3,
            faults: 3,
            fault_p50_us: 40,
            fault_p99_us: 90,
            fault_max_us: 120,
            last_page_us: 250_000,
        }),
        Message::Resume(Resume { session: 77 }),
        Message::ResumeState(ResumeState {
            pages: 2,
            words: vec![3, 0],
        }),
        Message::StreamsOpen(StreamsOpen {
            session: 77,
            count: 2,
        }),
        Message::StreamJoin(StreamJoin {
            session: 77,
            index: 1,
        }),
        Message::StreamsOpened(StreamsOpened { count: 2 }),
        Message::StripedRound(StripedRound { round: 1 }),
        Message::Prepare(Prepare { session: 9 }),
        Message::Decide(Decide {
            session: 9,
            commit: true,
        }),
        Message::BlackoutBegins(BlackoutBegins),
        Message::Started(Started {
            commit_to_run_us: 310,
            commit_to_reply_us: 120,
            last_pages_to_state_acked_us: 450,
        }),
        Message::Forwarded(Forwarded {
            frames: vec![vec![0xff; 60], vec![1, 2, 3]],
            held_done: true,
        }),
        Message::ForwardEnd(ForwardEnd {
            forwarded: 2,
            dropped: 0,
        }),
        Message::Bind(Bind { token: [0xa5; 32] }),
        Message::BindAck(BindAck::Accepted),
        Message::BindAck(BindAck::Refused {
            reason: "wrong session token".into(),
        }),
    ]
}

#[test]
fn a_bind_never_shows_its_token() {
    let shown = format!("{:?}", Bind { token: [0xa5; 32] });
    assert!(!shown.contains("165") && !shown.contains("a5"), "{shown}");
}

#[test]
fn every_message_round_trips_through_a_stream() {
    let messages = every_message();
    let mut wire = Vec::new();
    for m in &messages {
        write_message(&mut wire, m).unwrap();
    }
    let mut r = Cursor::new(wire);
    let mut scratch = Vec::new();
    for m in &messages {
        assert_eq!(&recv_message(&mut r, &mut scratch).unwrap(), m);
    }
    assert!(matches!(
        recv_message(&mut r, &mut scratch),
        Err(ProtocolError::PeerClosed)
    ));
}

#[test]
fn every_control_kind_has_a_message() {
    let kinds: Vec<FrameKind> = every_message().iter().map(Message::kind).collect();
    for kind in FrameKind::ALL {
        assert_eq!(kind.is_control(), kinds.contains(&kind), "{kind}");
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut payload = Message::RoundEnd(RoundEnd { round: 1, pages: 2 }).encode();
    payload.push(0);
    let mut wire = Vec::new();
    write_frame(&mut wire, FrameKind::RoundEnd, &payload).unwrap();
    let err = recv_message(&mut Cursor::new(wire), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Malformed {
                kind: FrameKind::RoundEnd,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_payload_under_the_wrong_kind_is_malformed() {
    let payload = Message::Abort(Abort { reason: "x".into() }).encode();
    let mut wire = Vec::new();
    write_frame(&mut wire, FrameKind::Offer, &payload).unwrap();
    let err = recv_message(&mut Cursor::new(wire), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Malformed {
                kind: FrameKind::Offer,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn hello_answers() {
    let ours = VersionRange::SUPPORTED;
    let hello = Hello::new(Role::Source);
    assert_eq!(
        hello.answer(ours, Role::Destination),
        HelloAck::Accepted {
            version: PROTOCOL_VERSION
        }
    );

    let same_role = hello.answer(ours, Role::Source);
    assert!(
        matches!(same_role, HelloAck::Refused { ref reason } if reason.contains("Source")),
        "{same_role:?}"
    );

    let wrong_magic = Hello {
        magic: *b"NOTFERRY",
        ..hello.clone()
    };
    assert!(matches!(
        wrong_magic.answer(ours, Role::Destination),
        HelloAck::Refused { .. }
    ));

    let future = Hello {
        versions: VersionRange::new(7, 9),
        ..hello
    };
    match future.answer(VersionRange::new(1, 3), Role::Destination) {
        HelloAck::Refused { reason } => assert!(
            reason.contains("v1..=v3") && reason.contains("v7..=v9"),
            "{reason}"
        ),
        other => panic!("accepted a disjoint range: {other:?}"),
    }
}

#[test]
fn offer_validation() {
    assert_eq!(offer().validate(), Ok(()));
    let with = |f: fn(&mut Offer)| {
        let mut o = offer();
        f(&mut o);
        o.validate()
    };
    assert_eq!(with(|o| o.vcpus = 0), Err(InvalidOffer::NoVcpus));
    assert!(matches!(
        with(|o| o.ram_ranges[0].len = 100),
        Err(InvalidOffer::BadRange { .. })
    ));
    assert!(matches!(
        with(|o| o.ram_ranges[1].gpa = 0x1234),
        Err(InvalidOffer::BadRange { .. })
    ));
    assert!(matches!(
        with(|o| o.ram_ranges[1].gpa = u64::MAX - 4095),
        Err(InvalidOffer::BadRange { .. })
    ));
    assert!(matches!(
        with(|o| o.ram_ranges.swap(0, 1)),
        Err(InvalidOffer::Unordered(..))
    ));
    assert!(matches!(
        with(|o| o.ram_ranges[1].gpa = 0x80000),
        Err(InvalidOffer::Unordered(..))
    ));
    assert!(matches!(
        with(|o| o.mem_bytes += 4096),
        Err(InvalidOffer::SizeMismatch { .. })
    ));
}

#[test]
fn offer_covers_only_its_ram() {
    let o = offer();
    assert!(o.covers(0, 1 << 20));
    assert!(o.covers(4 << 20, 4096));
    assert!(o.covers((6 << 20) - 4096, 4096));
    assert!(!o.covers((1 << 20) - 4096, 8192), "straddles a hole");
    assert!(!o.covers(2 << 20, 4096), "in the hole");
    assert!(!o.covers(6 << 20, 4096), "past the end");
    assert!(!o.covers(u64::MAX - 10, 4096), "wraps");
}
