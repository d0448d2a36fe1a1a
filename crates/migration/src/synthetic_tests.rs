//! The engine against the in-memory guest over real loopback TCP: source
//! and destination on their own threads, every page compared at the end.

use crate::transport::{Link, Listener};
use std::io::Read;
use std::thread;
use std::time::Duration;

use super::*;
use crate::policy::PolicyConfig;
use crate::precopy::{
    migrate, receive, Failure, MigrateError, MigrateOptions, ReceiveError, ReceiveOptions,
};
use crate::stats::MigrationReport;

const PAGES: usize = 4096; // 16 MiB

fn listen() -> (Listener, String) {
    let l = Listener::plain(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn options(target_ms: u64, bandwidth: Option<u64>) -> MigrateOptions {
    MigrateOptions {
        policy: PolicyConfig {
            downtime_target: Duration::from_millis(target_ms),
            ..Default::default()
        },
        mode: crate::mode::Mode::Precopy,
        bandwidth,
        io_timeout: Duration::from_secs(10),
        guest_report_wait: Duration::ZERO,
        link_recovery: Duration::ZERO,
        streams: 1,
        cpu_share: 0,
        cancel: None,
        tuning: None,
    }
}

type DestResult = Result<SyntheticRunning, ReceiveError>;

fn run_pair(
    source: &mut SyntheticSource,
    opts: &MigrateOptions,
    make: impl FnOnce(u64) -> Result<SyntheticIncoming, String> + Send + 'static,
) -> (Result<MigrationReport, Failure>, DestResult) {
    run_pair_listening(source, opts, false, make)
}

/// `run_pair`, with the destination keeping its listener for more
/// connections (page-data streams) when `keep_listener`.
fn run_pair_listening(
    source: &mut SyntheticSource,
    opts: &MigrateOptions,
    keep_listener: bool,
    make: impl FnOnce(u64) -> Result<SyntheticIncoming, String> + Send + 'static,
) -> (Result<MigrationReport, Failure>, DestResult) {
    let (listener, addr) = listen();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let more = keep_listener.then_some(&listener);
        receive(stream, more, &ReceiveOptions::default(), |offer| {
            make(offer.mem_bytes)
        })
        .map(|r| r.vm)
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let result = migrate(source, stream, &addr, opts, &mut |_| {});
    (result, dest.join().unwrap())
}

#[test]
fn a_busy_guest_arrives_page_for_page() {
    let mut source = SyntheticSource::new(PAGES, 200);
    thread::sleep(Duration::from_millis(20));
    let (result, dest) = run_pair(&mut source, &options(5, Some(64 << 20)), |b| {
        Ok(SyntheticIncoming::new(b))
    });
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    let running = dest.unwrap();
    assert!(
        source.is_paused(),
        "after the commit the source must stay paused"
    );
    assert!(
        running.mem == source.memory(),
        "destination memory differs from the source"
    );
    assert_eq!(running.state, source.state);
    assert!(report.rounds.len() >= 3, "{:?}", report.rounds);
    assert!(report.rounds.last().unwrap().blackout);
    assert!(report.zero_pages > 0);
    assert_eq!(report.outcome, "committed");
}

#[test]
fn a_refusing_destination_leaves_the_guest_running() {
    let mut source = SyntheticSource::new(PAGES, 50);
    let (result, dest) = run_pair(&mut source, &options(5, None), |_| {
        Err("no room for you".into())
    });
    let failure = result.unwrap_err();
    assert!(
        matches!(failure.error, MigrateError::Refused(ref r) if r.contains("no room")),
        "{}",
        failure.reason()
    );
    assert!(failure.vm_running && !source.is_paused());
    assert!(matches!(dest, Err(ReceiveError::Refused(_))));
    let before = source.writes();
    thread::sleep(Duration::from_millis(20));
    assert!(source.writes() > before, "the guest must keep running");
}

#[test]
fn a_destination_that_cannot_load_the_state_aborts_and_the_source_resumes() {
    let mut source = SyntheticSource::new(PAGES, 50);
    let (result, dest) = run_pair(&mut source, &options(5, None), |b| {
        let mut g = SyntheticIncoming::new(b);
        g.fail_load = true;
        Ok(g)
    });
    let failure = result.unwrap_err();
    assert!(
        failure.reason().contains("refuses every state"),
        "{}",
        failure.reason()
    );
    assert!(failure.vm_running && !source.is_paused());
    assert!(dest.is_err());
}

/// Plays a destination's part of the handshake through the real message
/// code: answers Hello and accepts the Offer.
fn fake_destination_handshake(stream: &mut Link) {
    use crate::protocol::*;
    let mut scratch = Vec::new();
    let Message::Hello(h) = recv_message(stream, &mut scratch).unwrap() else {
        panic!("expected Hello")
    };
    let ack = h.answer(VersionRange::SUPPORTED, Role::Destination);
    write_message(stream, &Message::HelloAck(ack)).unwrap();
    let Message::Offer(o) = recv_message(stream, &mut scratch).unwrap() else {
        panic!("expected Offer")
    };
    let accept = Accept {
        reserved_bytes: o.mem_bytes,
    };
    write_message(stream, &Message::Accept(accept)).unwrap();
}

#[test]
fn a_destination_that_vanishes_mid_round_leaves_the_guest_running() {
    let mut source = SyntheticSource::new(PAGES * 4, 50);
    let (listener, addr) = listen();
    // A fake destination: accepts the handshake through the real code path
    // by answering Hello/Offer, then reads a little and hangs up.
    let peer = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        fake_destination_handshake(&mut stream);
        let mut buf = vec![0u8; 1 << 20];
        stream.read_exact(&mut buf).unwrap();
        drop(stream);
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let result = migrate(
        &mut source,
        stream,
        &addr,
        &options(5, Some(32 << 20)),
        &mut |_| {},
    );
    peer.join().unwrap();
    let failure = result.unwrap_err();
    assert!(
        failure.vm_running && !source.is_paused(),
        "{}",
        failure.reason()
    );
    assert!(failure.report.outcome.contains("running on the source"));
}

#[test]
fn the_bandwidth_cap_holds_over_every_100ms_window() {
    let mut source = SyntheticSource::new(PAGES, 0);
    let cap = 40u64 << 20;
    let (result, dest) = run_pair(&mut source, &options(50, Some(cap)), |b| {
        Ok(SyntheticIncoming::new(b))
    });
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    assert!(dest.unwrap().mem == source.memory());
    let peak = report.peak_bytes_in_window(100.0);
    // Half the pages are data: ~8 MiB at 40 MiB/s takes ~200 ms.
    assert!(report.total_ms > 150.0, "{}", report.total_ms);
    assert!(
        peak as f64 <= cap as f64 * 0.1 * 1.15,
        "peak {peak} in 100 ms, cap {cap}/s"
    );
}

#[test]
fn a_guest_that_outruns_the_link_is_braked_and_still_arrives() {
    // 1200 pages/ms is ~4.7 GiB/s of writes, against a 64 MiB/s link.
    let mut source = SyntheticSource::new(PAGES, 1200);
    let (result, dest) = run_pair(&mut source, &options(20, Some(64 << 20)), |b| {
        Ok(SyntheticIncoming::new(b))
    });
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    assert!(report.max_throttle_percent > 0, "{:?}", report.rounds);
    assert!(dest.unwrap().mem == source.memory());
}

/// The destination's memory at the end and what each touch read.
type PostcopyDest = Result<(Vec<u8>, Vec<(u64, Vec<u8>)>), String>;

/// Migrates with post-copy possible; a "vCPU" on the destination touches
/// `touches` pages while the memory follows. Returns the source's result,
/// the destination's memory, and what each touch read (page, bytes).
fn run_postcopy_pair(
    source: &mut SyntheticSource,
    opts: &MigrateOptions,
    touches: Vec<u64>,
) -> (Result<MigrationReport, Failure>, PostcopyDest) {
    let (listener, addr) = listen();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let received = receive(
            stream,
            Some(&listener),
            &ReceiveOptions::default(),
            |offer| Ok(SyntheticIncoming::new(offer.mem_bytes)),
        )
        .map_err(|e| e.to_string())?;
        let Some(handle) = received.postcopy else {
            return Ok((received.vm.mem, Vec::new()));
        };
        let lazy = received.vm.lazy.clone().expect("post-copy memory");
        let toucher = thread::spawn(move || {
            touches
                .into_iter()
                .map(|gpa| (gpa, lazy.touch(gpa)))
                .collect::<Vec<_>>()
        });
        let seen = toucher.join().unwrap();
        handle.wait().map_err(|e| e.to_string())?;
        Ok((received.vm.lazy.unwrap().memory(), seen))
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let result = migrate(source, stream, &addr, opts, &mut |_| {});
    (result, dest.join().unwrap())
}

#[test]
fn postcopy_moves_the_vm_first_and_every_page_follows() {
    let mut source = SyntheticSource::new(PAGES, 200);
    thread::sleep(Duration::from_millis(20));
    let mut opts = options(20, Some(32 << 20));
    opts.mode = crate::mode::Mode::Postcopy;
    // Pages far apart, so most are touched before the push reaches them.
    let touches: Vec<u64> = (0..40u64)
        .map(|i| (PAGES as u64 - 1 - i * 97) * 4096)
        .collect();
    let (result, dest) = run_postcopy_pair(&mut source, &opts, touches);
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    let (mem, seen) = dest.unwrap();
    let expected = source.memory();
    assert!(
        mem == expected,
        "destination memory differs from the source"
    );
    for (gpa, page) in seen {
        assert_eq!(
            page[..],
            expected[gpa as usize..gpa as usize + 4096],
            "page {gpa:#x}"
        );
    }
    let pc = report.postcopy.expect("a post-copy report");
    assert_eq!(report.rounds.len(), 0, "post-copy sends no rounds first");
    assert_eq!(pc.needed_pages, PAGES as u64);
    assert!(pc.requested_pages > 0, "{pc:?}");
    assert!(
        pc.pushed_pages + pc.requested_pages >= pc.needed_pages,
        "{pc:?}"
    );
    assert!(
        pc.fault_max_us > 0 && pc.fault_p50_us <= pc.fault_p99_us,
        "{pc:?}"
    );
    assert_eq!(report.outcome, "committed");
    assert!(source.is_paused());
}

#[test]
fn hybrid_switches_to_postcopy_when_the_writer_outruns_the_link() {
    // ~4.7 GiB/s of writes against a 64 MiB/s link: pre-copy cannot end.
    let mut source = SyntheticSource::new(PAGES, 1200);
    let mut opts = options(20, Some(64 << 20));
    opts.mode = crate::mode::Mode::Hybrid;
    let (result, dest) = run_postcopy_pair(&mut source, &opts, vec![0, 4096 * 3]);
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    let (mem, _) = dest.unwrap();
    assert!(mem == source.memory(), "destination memory differs");
    let pc = report.postcopy.expect("hybrid moved to post-copy");
    assert!(pc.reason.contains("fast"), "{}", pc.reason);
    assert_eq!(report.max_throttle_percent, 0, "hybrid does not brake");
    assert!(!report.rounds.is_empty());
    assert!(pc.needed_pages > 0, "{pc:?}");
}

#[test]
fn hybrid_ends_as_precopy_when_rounds_converge() {
    let mut source = SyntheticSource::new(PAGES, 5);
    let mut opts = options(50, None);
    opts.mode = crate::mode::Mode::Hybrid;
    let (result, dest) = run_postcopy_pair(&mut source, &opts, Vec::new());
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    assert!(report.postcopy.is_none());
    assert!(dest.unwrap().0 == source.memory());
}

/// 96 MiB: the first pass is past the size that goes out striped.
const STRIPED_PAGES: usize = 24576;

fn streams_options(streams: u16) -> MigrateOptions {
    MigrateOptions {
        streams,
        ..options(5, None)
    }
}

#[test]
fn a_large_round_goes_out_on_several_streams_and_every_page_arrives() {
    let mut source = SyntheticSource::new(STRIPED_PAGES, 200);
    thread::sleep(Duration::from_millis(20));
    let (result, dest) = run_pair_listening(&mut source, &streams_options(3), true, |b| {
        Ok(SyntheticIncoming::new(b))
    });
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    let running = dest.unwrap();
    assert_eq!(report.streams, 3);
    assert!(
        running.mem == source.memory(),
        "destination memory differs from the source"
    );
    assert_eq!(running.state, source.state);
    assert!(report.rounds.len() >= 2, "{:?}", report.rounds);
    assert_eq!(report.outcome, "committed");
}

#[test]
fn a_destination_without_a_listener_gets_every_page_on_one_stream() {
    let mut source = SyntheticSource::new(STRIPED_PAGES, 50);
    let (result, dest) = run_pair_listening(&mut source, &streams_options(2), false, |b| {
        Ok(SyntheticIncoming::new(b))
    });
    let report = result.unwrap_or_else(|f| panic!("{}", f.reason()));
    assert_eq!(report.streams, 0);
    assert!(dest.unwrap().mem == source.memory());
}

#[test]
fn a_stream_cut_mid_round_leaves_the_guest_running() {
    let mut source = SyntheticSource::new(STRIPED_PAGES, 50);
    let (listener, addr) = listen();
    // A fake destination: takes the handshake and both streams, reads a
    // little of one stream's round, then hangs up everything.
    let peer = thread::spawn(move || {
        use crate::protocol::*;
        let (mut main, _) = listener.accept().unwrap();
        fake_destination_handshake(&mut main);
        let mut scratch = Vec::new();
        let Message::StreamsOpen(open) = recv_message(&mut main, &mut scratch).unwrap() else {
            panic!()
        };
        let streams: Vec<Link> = (0..open.count)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                let Message::StreamJoin(_) = recv_message(&mut s, &mut scratch).unwrap() else {
                    panic!()
                };
                s
            })
            .collect();
        let opened = StreamsOpened { count: open.count };
        write_message(&mut main, &Message::StreamsOpened(opened)).unwrap();
        let Message::StripedRound(_) = recv_message(&mut main, &mut scratch).unwrap() else {
            panic!()
        };
        let mut buf = vec![0u8; 1 << 20];
        (&streams[0]).read_exact(&mut buf).unwrap();
        drop((streams, main));
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let result = migrate(&mut source, stream, &addr, &streams_options(2), &mut |_| {});
    peer.join().unwrap();
    let failure = result.unwrap_err();
    assert!(
        failure.vm_running && !source.is_paused(),
        "{}",
        failure.reason()
    );
    assert!(
        failure.reason().contains("page-data streams"),
        "{}",
        failure.reason()
    );
}

/// A cancel accepted while the first pass runs: the engine stops before
/// any blackout, the guest never paused, and the seal stays unset.
#[test]
fn an_accepted_cancel_ends_the_migration_with_the_guest_running_here() {
    use crate::cancel::{CancelState, Verdict};
    let mut source = SyntheticSource::new(PAGES, 50);
    let cancel = std::sync::Arc::new(CancelState::new());
    // A target far above the pass's send time: without the cancel the
    // blackout would follow the first pass.
    let mut opts = options(60_000, Some(32 << 20));
    opts.cancel = Some(cancel.clone());
    let (listener, addr) = listen();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        receive(stream, None, &ReceiveOptions::default(), |offer| {
            Ok(SyntheticIncoming::new(offer.mem_bytes))
        })
        .map(|r| r.vm)
    });
    let stream = Link::plain(std::net::TcpStream::connect(&addr).unwrap());
    let mut verdicts = Vec::new();
    let result = migrate(&mut source, stream, &addr, &opts, &mut |p| {
        if p.phase == "round" && p.sent_bytes > 0 {
            verdicts.push(cancel.cancel());
        }
    });
    let failure = result.expect_err("a cancelled migration commits nothing");
    assert!(
        matches!(failure.error, MigrateError::Cancelled),
        "{}",
        failure.reason()
    );
    assert!(failure.vm_running && !source.is_paused());
    assert!(!verdicts.is_empty() && verdicts.iter().all(|v| *v == Verdict::Accepted));
    assert!(cancel.is_cancelled() && cancel.sealed().is_none());
    assert!(
        dest.join().unwrap().is_err(),
        "the destination must not keep the VM"
    );
    assert!(failure.report.rounds.iter().all(|r| !r.blackout));
}

/// A cancel accepted before the engine even starts (the last check comes
/// after the first pass): the seal at the blackout fails, so the VM stays.
#[test]
fn a_cancel_before_the_seal_stops_the_blackout_from_beginning() {
    use crate::cancel::CancelState;
    let mut source = SyntheticSource::new(PAGES, 50);
    let cancel = std::sync::Arc::new(CancelState::new());
    cancel.cancel();
    let mut opts = options(60_000, None);
    opts.cancel = Some(cancel.clone());
    let (result, dest) = run_pair(&mut source, &opts, |b| Ok(SyntheticIncoming::new(b)));
    let failure = result.expect_err("cancelled");
    assert!(matches!(failure.error, MigrateError::Cancelled));
    assert!(failure.vm_running && !source.is_paused());
    assert!(dest.is_err());
}

/// After a commit, pre-copy or post-copy, the engine has sealed: a cancel
/// is refused with the stage that sealed it.
#[test]
fn a_cancel_after_the_seal_is_refused_and_the_migration_commits() {
    use crate::cancel::{CancelState, Sealed, Verdict};
    for mode in [crate::mode::Mode::Precopy, crate::mode::Mode::Postcopy] {
        let mut source = SyntheticSource::new(PAGES, 50);
        let cancel = std::sync::Arc::new(CancelState::new());
        let mut opts = options(20, None);
        opts.mode = mode;
        opts.cancel = Some(cancel.clone());
        let result = if mode == crate::mode::Mode::Postcopy {
            run_postcopy_pair(&mut source, &opts, Vec::new()).0
        } else {
            run_pair(&mut source, &opts, |b| Ok(SyntheticIncoming::new(b))).0
        };
        let report = result.unwrap_or_else(|f| panic!("{mode:?}: {}", f.reason()));
        assert_eq!(report.outcome, "committed");
        let at = if mode == crate::mode::Mode::Postcopy {
            Sealed::Postcopy
        } else {
            Sealed::Blackout
        };
        assert_eq!(cancel.cancel(), Verdict::Refused(at), "{mode:?}");
        assert!(source.is_paused());
    }
}
