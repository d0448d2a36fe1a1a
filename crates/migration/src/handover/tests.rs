use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::transport::Link;

/// Frames waiting at the old place; a test may add strays later.
#[derive(Clone, Default)]
struct OldPlace(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl OldPlace {
    fn arrive(&self, frame: &[u8]) {
        self.0.lock().unwrap().push_back(frame.to_vec());
    }
}

impl SourceNetwork for OldPlace {
    fn take_waiting(&mut self, max: usize) -> Result<Vec<Vec<u8>>, GuestError> {
        let mut q = self.0.lock().unwrap();
        let n = q.len().min(max);
        Ok(q.drain(..n).collect())
    }
}

/// What the destination's device saw: the frames, and how many had come
/// when the host's network was opened.
#[derive(Default)]
struct NewPlace {
    delivered: Vec<Vec<u8>>,
    opened_after: Option<usize>,
}

impl DestinationNetwork for NewPlace {
    fn deliver(&mut self, frame: Vec<u8>) -> Result<(), GuestError> {
        self.delivered.push(frame);
        Ok(())
    }

    fn open(&mut self) -> Result<(), GuestError> {
        assert!(self.opened_after.is_none(), "opened twice");
        self.opened_after = Some(self.delivered.len());
        Ok(())
    }
}

fn link_pair() -> (Link, Link) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (Link::plain(a), Link::plain(b))
}

fn frame(i: u32) -> Vec<u8> {
    let mut f = vec![0u8; 60 + (i as usize % 1400)];
    f[..4].copy_from_slice(&i.to_le_bytes());
    f
}

fn fast() -> ForwardLimits {
    ForwardLimits {
        window: Duration::from_secs(2),
        quiet: Duration::from_millis(100),
        max_frames: 10_000,
    }
}

#[test]
fn held_frames_arrive_in_order_before_the_host_network_opens_then_strays() {
    let (mut src, mut dst) = link_pair();
    let old = OldPlace::default();
    for i in 0..150 {
        old.arrive(&frame(i));
    }
    let mut net = old.clone();
    let limits = fast();
    let source = std::thread::spawn(move || {
        let strays = std::thread::spawn({
            let old = old.clone();
            move || {
                std::thread::sleep(Duration::from_millis(30));
                for i in 150..160 {
                    old.arrive(&frame(i));
                }
            }
        });
        let report = forward_after_commit(&mut src, &mut net, &limits);
        strays.join().unwrap();
        report
    });
    let mut place = NewPlace::default();
    let got = deliver_forwarded(&mut dst, &mut place, &fast());
    let sent = source.join().unwrap();
    assert_eq!(sent.error, None);
    assert_eq!(
        (sent.held, sent.strays, sent.dropped),
        (150, 10, 0),
        "{sent:?}"
    );
    assert_eq!(got.error, None, "{got:?}");
    assert_eq!(got.delivered, 160);
    assert_eq!(got.source_forwarded, Some(160));
    let expected: Vec<Vec<u8>> = (0..160).map(frame).collect();
    assert_eq!(place.delivered, expected, "every frame, once, in order");
    assert_eq!(
        place.opened_after,
        Some(150),
        "opened right after the held ones"
    );
    assert_eq!(got.bytes, sent.bytes);
}

#[test]
fn forwarding_ends_once_the_old_place_is_quiet() {
    let (mut src, mut dst) = link_pair();
    let limits = ForwardLimits {
        window: Duration::from_secs(5),
        quiet: Duration::from_millis(50),
        max_frames: 100,
    };
    let source = std::thread::spawn(move || {
        forward_after_commit(&mut src, &mut OldPlace::default(), &limits)
    });
    let mut place = NewPlace::default();
    let got = deliver_forwarded(&mut dst, &mut place, &limits);
    let sent = source.join().unwrap();
    assert_eq!((sent.held, sent.strays), (0, 0));
    assert!(
        sent.window_ms >= 50.0 && sent.window_ms < 1000.0,
        "{sent:?}"
    );
    assert_eq!(place.opened_after, Some(0));
    assert_eq!(got.source_forwarded, Some(0));
}

#[test]
fn a_flood_is_cut_at_the_limit_and_counted_on_both_sides() {
    let (mut src, mut dst) = link_pair();
    let old = OldPlace::default();
    for i in 0..100 {
        old.arrive(&frame(i));
    }
    let limits = ForwardLimits {
        max_frames: 70,
        ..fast()
    };
    let mut net = old.clone();
    let source = std::thread::spawn(move || forward_after_commit(&mut src, &mut net, &limits));
    let mut place = NewPlace::default();
    let got = deliver_forwarded(&mut dst, &mut place, &limits);
    let sent = source.join().unwrap();
    assert_eq!((sent.held, sent.dropped), (70, 30), "{sent:?}");
    assert_eq!(got.delivered, 70);
    assert_eq!(got.source_dropped, Some(30));
    assert_eq!(place.delivered, (0..70).map(frame).collect::<Vec<_>>());
}

#[test]
fn a_source_that_vanishes_still_leaves_the_destination_network_open() {
    let (src, mut dst) = link_pair();
    drop(src);
    let mut place = NewPlace::default();
    let got = deliver_forwarded(&mut dst, &mut place, &fast());
    assert!(got.error.is_some(), "{got:?}");
    assert_eq!(place.opened_after, Some(0), "the VM must get its network");
}

#[test]
fn a_destination_that_vanishes_ends_forwarding_with_the_reason() {
    let (mut src, dst) = link_pair();
    drop(dst);
    let old = OldPlace::default();
    // Enough to fill the socket buffers that remain after the peer closed.
    for i in 0..5000 {
        old.arrive(&frame(i));
    }
    let mut net = old.clone();
    let sent = forward_after_commit(&mut src, &mut net, &fast());
    assert!(sent.error.is_some(), "{sent:?}");
}

#[test]
fn announces_follow_the_schedule_from_the_start() {
    struct Count(Mutex<u32>);
    impl Announcer for Count {
        fn announce(&self) -> Result<(), GuestError> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }
    static SHORT: AnnounceSchedule = &[
        Duration::ZERO,
        Duration::from_millis(20),
        Duration::from_millis(60),
    ];
    let count = Arc::new(Count(Mutex::new(0)));
    let t0 = Instant::now();
    let (times, failure) = announce_on_schedule(count.clone(), SHORT, t0)
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(failure, None);
    assert_eq!(*count.0.lock().unwrap(), 3);
    assert_eq!(times.len(), 3);
    // Never early (a loaded host may make them late).
    assert!(times[1] >= 20.0 && times[2] >= 60.0, "{times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(ANNOUNCE_SCHEDULE.len(), 5);
}

#[test]
fn a_forwarder_sends_at_most_its_budget_per_step_and_ends_in_order() {
    let (mut src, mut dst) = link_pair();
    let mut old = OldPlace::default();
    for i in 0..(3 * FRAMES_PER_MESSAGE as u32) {
        old.arrive(&frame(i));
    }
    let limits = ForwardLimits {
        quiet: Duration::from_millis(30),
        ..fast()
    };
    let receiver = std::thread::spawn(move || {
        let mut place = NewPlace::default();
        let got = deliver_forwarded(&mut dst, &mut place, &limits);
        (got, place)
    });
    let mut forwarder = Forwarder::new(&mut old, limits);
    // Between two page batches, a post-copy lets one message through.
    assert_eq!(forwarder.pump(&mut src, 1).unwrap(), Pumped::Busy);
    assert_eq!(forwarder.pump(&mut src, 1).unwrap(), Pumped::Busy);
    assert_eq!(forwarder.pump(&mut src, 1).unwrap(), Pumped::Busy);
    // The held ones are out: the held-done mark, then nothing waits.
    assert_eq!(forwarder.pump(&mut src, 8).unwrap(), Pumped::Idle);
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(forwarder.pump(&mut src, 8).unwrap(), Pumped::Done);
    assert!(forwarder.is_done());
    let sent = forwarder.finish();
    let (got, place) = receiver.join().unwrap();
    assert_eq!(sent.error, None, "{sent:?}");
    assert_eq!(sent.held, 3 * FRAMES_PER_MESSAGE as u64);
    assert_eq!(got.delivered, sent.held);
    assert_eq!(place.opened_after, Some(3 * FRAMES_PER_MESSAGE));
    assert_eq!(got.source_forwarded, Some(sent.held));
}

#[test]
fn a_delivery_opens_the_network_at_its_deadline_without_a_source() {
    let limits = ForwardLimits {
        window: Duration::ZERO,
        ..fast()
    };
    let mut place = NewPlace::default();
    let mut delivery = Delivery::new(Box::new(&mut place), &limits);
    assert!(delivery.expecting());
    assert!(!delivery.check_deadline(), "the grace period still runs");
    delivery.give_up("the link failed".into());
    assert!(!delivery.expecting());
    let report = delivery.finish();
    assert_eq!(report.error.as_deref(), Some("the link failed"));
    assert_eq!(place.opened_after, Some(0), "the VM gets its network");
}

#[test]
fn only_a_v11_peer_gets_frames_during_postcopy() {
    use crate::protocol::{NET_HANDOVER_VERSION, PROTOCOL_VERSION};
    // v7..v10: forwarding after a pre-copy commit only; their post-copy
    // reader would take a Forwarded frame for a protocol violation.
    for old in NET_HANDOVER_VERSION..=10 {
        assert!(!forwards_during_postcopy(old), "v{old}");
    }
    assert!(forwards_during_postcopy(11));
    assert!(forwards_during_postcopy(PROTOCOL_VERSION));
}
