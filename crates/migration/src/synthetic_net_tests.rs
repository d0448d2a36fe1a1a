//! Post-copy and hybrid forward the VM's frames too (v11): the engine
//! against the synthetic guests and cards over loopback TCP.

use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::handover::{DeliverReport, ForwardReport};
use crate::mode::Mode;
use crate::policy::PolicyConfig;
use crate::precopy::{migrate, receive, MigrateOptions, ReceiveOptions};
use crate::stats::MigrationReport;
use crate::synthetic::{SyntheticIncoming, SyntheticSource};
use crate::transport::{Link, Listener};

fn options(mode: Mode, bandwidth: Option<u64>) -> MigrateOptions {
    MigrateOptions {
        policy: PolicyConfig {
            downtime_target: Duration::from_millis(20),
            ..Default::default()
        },
        mode,
        bandwidth,
        io_timeout: Duration::from_secs(10),
        guest_report_wait: Duration::ZERO,
        link_recovery: Duration::ZERO,
        ..Default::default()
    }
}

fn frame(i: u32) -> Vec<u8> {
    let mut f = vec![0u8; 60 + (i as usize % 1400)];
    f[..4].copy_from_slice(&i.to_le_bytes());
    f
}

/// What the destination saw: its card, the delivery's report, whether the
/// memory arrived whole.
struct Arrived {
    card: Option<NewPlace>,
    delivery: Option<DeliverReport>,
    memory: Vec<u8>,
}

/// Migrates `source` (post-copy or hybrid) to a destination with `card`;
/// `strays` come to the old place once the destination opened its network
/// (the held frames are all in by then).
fn migrate_with_cards(
    source: &mut SyntheticSource,
    opts: &MigrateOptions,
    card: Option<NewPlace>,
    strays: Vec<Vec<u8>>,
) -> (MigrationReport, Arrived) {
    let listener = Listener::plain(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap().to_string();
    let dest_card = card.clone();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let received = receive(
            stream,
            Some(&listener),
            &ReceiveOptions::default(),
            |offer| {
                let mut incoming = SyntheticIncoming::new(offer.mem_bytes);
                incoming.network = dest_card;
                Ok(incoming)
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let handle = received.postcopy.expect("the VM moved by post-copy");
        assert_eq!(handle.forwards_network(), received.vm.network.is_some());
        // A "vCPU" that reads a page far from the push's start.
        let lazy = received.vm.lazy.clone().expect("post-copy memory");
        lazy.touch((lazy.memory().len() as u64 / 2) & !4095);
        while !handle.is_finished() {
            thread::sleep(Duration::from_millis(5));
        }
        let delivery = handle.network_report();
        handle.wait().unwrap_or_else(|e| panic!("{e}"));
        Arrived {
            card: received.vm.network.clone(),
            delivery,
            memory: lazy.memory(),
        }
    });
    let old = source.network.clone();
    let card_seen = card.clone();
    let stray_thread = thread::spawn(move || {
        let (Some(old), Some(card)) = (old, card_seen) else {
            return;
        };
        let t0 = Instant::now();
        while card.seen().opened_after.is_none() && t0.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(1));
        }
        for f in strays {
            old.arrive(&f);
            thread::sleep(Duration::from_millis(2));
        }
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let report = migrate(source, stream, &addr, opts, &mut |_| {});
    let report = report.unwrap_or_else(|f| panic!("{}", f.reason()));
    stray_thread.join().unwrap();
    (report, dest.join().unwrap())
}

fn assert_every_frame_in_order(
    sent: &ForwardReport,
    card: &NewPlace,
    delivery: &DeliverReport,
    held: u32,
    strays: u32,
) {
    assert_eq!(sent.error, None, "{sent:?}");
    assert_eq!(
        (sent.held, sent.strays, sent.dropped),
        (u64::from(held), u64::from(strays), 0),
        "{sent:?}"
    );
    let seen = card.seen();
    let expected: Vec<Vec<u8>> = (0..held + strays).map(frame).collect();
    assert!(seen.delivered == expected, "every frame, once, in order");
    assert_eq!(
        seen.opened_after,
        Some(held as usize),
        "opened right after the held ones"
    );
    assert_eq!(seen.opens, 1);
    assert_eq!(delivery.error, None, "{delivery:?}");
    assert_eq!(delivery.delivered, u64::from(held + strays));
    assert_eq!(delivery.source_forwarded, Some(u64::from(held + strays)));
    assert_eq!(delivery.bytes, sent.bytes);
}

#[test]
fn postcopy_forwards_the_held_frames_first_then_strays_between_the_pages() {
    let mut source = SyntheticSource::new(4096, 200);
    let old = OldPlace::default();
    for i in 0..150 {
        old.arrive(&frame(i));
    }
    source.network = Some(old.clone());
    let card = NewPlace::default();
    // 16 MiB at 32 MiB/s: the strays come while pages are still pushed.
    let opts = options(Mode::Postcopy, Some(32 << 20));
    let strays = (150..160).map(frame).collect();
    let (report, arrived) = migrate_with_cards(&mut source, &opts, Some(card.clone()), strays);
    assert!(arrived.memory == source.memory(), "memory differs");
    let sent = report.network.expect("the source's forwarding report");
    assert_every_frame_in_order(&sent, &card, &arrived.delivery.unwrap(), 150, 10);
    assert!(arrived.card.is_some());
    assert_eq!(old.waiting(), 0);
}

#[test]
fn strays_after_the_last_page_still_reach_the_guest() {
    // 1 MiB, no cap: every page is there long before the strays stop.
    let mut source = SyntheticSource::new(256, 5);
    let old = OldPlace::default();
    for i in 0..3 {
        old.arrive(&frame(i));
    }
    source.network = Some(old.clone());
    let card = NewPlace::default();
    let opts = options(Mode::Postcopy, None);
    let strays = (3..40).map(frame).collect();
    let (report, arrived) = migrate_with_cards(&mut source, &opts, Some(card.clone()), strays);
    assert!(arrived.memory == source.memory(), "memory differs");
    let sent = report.network.expect("the source's forwarding report");
    assert_every_frame_in_order(&sent, &card, &arrived.delivery.unwrap(), 3, 37);
    let pc = report.postcopy.expect("post-copy");
    assert!(
        sent.window_ms > pc.last_page_ms,
        "the strays outlasted the pages: {sent:?} {pc:?}"
    );
}

#[test]
fn hybrid_forwards_the_held_frames_once_it_switched() {
    // ~4.7 GiB/s of writes against a 64 MiB/s link: pre-copy cannot end.
    let mut source = SyntheticSource::new(4096, 1200);
    let old = OldPlace::default();
    source.network = Some(old.clone());
    let card = NewPlace::default();
    let opts = options(Mode::Hybrid, Some(64 << 20));
    // Held: what reaches the card from its pause on; here, from the start.
    for i in 0..64 {
        old.arrive(&frame(i));
    }
    let strays = (64..80).map(frame).collect();
    let (report, arrived) = migrate_with_cards(&mut source, &opts, Some(card.clone()), strays);
    assert!(!report.rounds.is_empty(), "hybrid starts with pre-copy");
    assert!(report.postcopy.is_some(), "and switched");
    assert!(arrived.memory == source.memory(), "memory differs");
    let sent = report.network.expect("the source's forwarding report");
    assert_every_frame_in_order(&sent, &card, &arrived.delivery.unwrap(), 64, 16);
}

#[test]
fn a_destination_without_a_card_drops_the_frames_and_keeps_the_vm() {
    let mut source = SyntheticSource::new(1024, 5);
    let old = OldPlace::default();
    for i in 0..20 {
        old.arrive(&frame(i));
    }
    source.network = Some(old.clone());
    let opts = options(Mode::Postcopy, None);
    let (report, arrived) = migrate_with_cards(&mut source, &opts, None, Vec::new());
    assert!(arrived.memory == source.memory(), "memory differs");
    assert!(arrived.delivery.is_none());
    let sent = report.network.expect("the source forwarded");
    assert_eq!(sent.held, 20, "{sent:?}");
}

#[test]
fn a_postcopy_without_a_card_forwards_nothing() {
    let mut source = SyntheticSource::new(1024, 5);
    let opts = options(Mode::Postcopy, None);
    let (report, arrived) = migrate_with_cards(&mut source, &opts, None, Vec::new());
    assert!(arrived.memory == source.memory(), "memory differs");
    assert_eq!(report.network, None);
}
