//! The engine against the in-memory guest over real loopback TCP: source
//! and destination on their own threads, every page compared at the end.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use super::*;
use crate::policy::PolicyConfig;
use crate::precopy::{
    migrate, receive, Failure, MigrateError, PrecopyOptions, ReceiveError, ReceiveOptions,
};
use crate::stats::MigrationReport;

const PAGES: usize = 4096; // 16 MiB

fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn options(target_ms: u64, bandwidth: Option<u64>) -> PrecopyOptions {
    PrecopyOptions {
        policy: PolicyConfig {
            downtime_target: Duration::from_millis(target_ms),
            ..Default::default()
        },
        bandwidth,
        io_timeout: Duration::from_secs(10),
        guest_report_wait: Duration::ZERO,
    }
}

type DestResult = Result<SyntheticRunning, ReceiveError>;

fn run_pair(
    source: &mut SyntheticSource,
    opts: &PrecopyOptions,
    make: impl FnOnce(u64) -> Result<SyntheticIncoming, String> + Send + 'static,
) -> (Result<MigrationReport, Failure>, DestResult) {
    let (listener, addr) = listen();
    let dest = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        receive(stream, &ReceiveOptions::default(), |offer| {
            make(offer.mem_bytes)
        })
        .map(|r| r.vm)
    });
    let stream = TcpStream::connect(&addr).unwrap();
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

#[test]
fn a_destination_that_vanishes_mid_round_leaves_the_guest_running() {
    let mut source = SyntheticSource::new(PAGES * 4, 50);
    let (listener, addr) = listen();
    // A fake destination: accepts the handshake through the real code path
    // by answering Hello/Offer, then reads a little and hangs up.
    let peer = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut scratch = Vec::new();
        use crate::protocol::*;
        let Message::Hello(h) = recv_message(&mut stream, &mut scratch).unwrap() else {
            panic!()
        };
        write_message(
            &mut stream,
            &Message::HelloAck(h.answer(VersionRange::SUPPORTED, Role::Destination)),
        )
        .unwrap();
        let Message::Offer(o) = recv_message(&mut stream, &mut scratch).unwrap() else {
            panic!()
        };
        write_message(
            &mut stream,
            &Message::Accept(Accept {
                reserved_bytes: o.mem_bytes,
            }),
        )
        .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        stream.read_exact(&mut buf).unwrap();
        drop(stream);
    });
    let stream = TcpStream::connect(&addr).unwrap();
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
