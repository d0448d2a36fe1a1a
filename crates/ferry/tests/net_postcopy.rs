//! One TCP connection survives a post-copy and a hybrid migration, on real
//! KVM, real userfaultfd and real taps in the netlab topology: the client
//! probes over one connection every 1 ms (and UDP every 1 ms) while the VM
//! moves from host A to host B and runs there with part of its memory
//! still on A. The card on B writes received frames into guest buffers
//! that may not have arrived yet; those writes wait in the fault path like
//! the vCPUs' reads. No TCP request may be lost, no reset, the guest verifies its
//! memory on B, and the longest reply gap stays bounded. No UDP probe may
//! be lost either: those that reach host A from the pause on are held there
//! and forwarded between the pushed pages (protocol v11), and delivered
//! into the guest on B before B's tap opens (and a frame B's card reads
//! from its tap just as it is released follows them, never stranded).
//! Without root or /dev/kvm each test says SKIPPED and returns.

mod common;

use std::time::Duration;

use common::migrations::stop_destination;
use common::net::{can_run, long_probe, migrate_verified, net_source, serial, Committed};
use common::TempDir;
use ferry_netlab::{Host, ProbeReport, Topology};
use serde_json::Value;

/// The longest reply gap a post-copy may cost the client (measured here:
/// 6 to 15 ms on a shared host); a segment left to Linux's retransmission
/// timeout would cost 200 ms or more.
const LONGEST_GAP: Duration = Duration::from_millis(500);
/// Requests the client sends over the connection at least.
const MIN_REQUESTS: u64 = 1000;

/// Migrates the networked VM from A to B with `migrate_args` while the
/// client probes; asserts the connection kept without loss, the guest
/// verified on B, post-copy really ran, and the gap bounded.
fn tcp_survives(test: &str, prefix: &str, subnet: u16, migrate_args: &[&str]) -> Value {
    let topo = Topology::up_on_subnet(prefix, subnet).expect("topology");
    let dir = TempDir::new(test);
    let (mut src, socket) = net_source(&dir, &topo);
    let probe = long_probe(&topo);
    std::thread::sleep(Duration::from_millis(500));
    let (
        Committed {
            mut dst, report, ..
        },
        first,
    ) = migrate_verified(&dir, &topo, &mut src, &socket, Host::B, "B", migrate_args);
    // Traffic goes on for a while on host B over the same connection, and
    // until the client sent its share (on a loaded host it skips slots).
    std::thread::sleep(Duration::from_millis(1000));
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while probe.sent() < MIN_REQUESTS && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe_report = probe.stop();
    let pc = &report["postcopy"];
    eprintln!(
        "{test}: mode {}, guest stall on arrival {} us; post-copy: {} pages missing at the switch ({} pushed, {} on demand), faults {}, fault max {} us, last page at {} ms; source forwarded {}",
        report["mode"],
        first.stall_us,
        pc["needed_pages"],
        pc["pushed_pages"],
        pc["requested_pages"],
        pc["faults"],
        pc["fault_max_us"],
        pc["last_page_ms"],
        report["network"]
    );
    assert!(
        pc.is_object(),
        "the migration must have gone through post-copy: {report:#}"
    );
    assert!(pc["needed_pages"].as_u64().unwrap_or(0) > 0, "{pc:#}");
    let network = &report["network"];
    assert!(
        network.is_object() && network["error"].is_null(),
        "the source forwarded the VM's frames during post-copy: {network:#}"
    );
    assert_tcp_kept_without_loss(test, &probe_report);
    assert_gap_bounded(test, &probe_report);
    stop_destination(&mut dst);
    topo.down().unwrap();
    report
}

/// Without loss: neither a TCP request nor a UDP probe (what reached the
/// source from the pause on was forwarded to the guest on B).
fn assert_tcp_kept_without_loss(test: &str, report: &ProbeReport) {
    eprint!("{test}: {report}");
    let lost = report.losses(MIN_REQUESTS);
    assert!(lost.is_empty(), "{test}: {}\n{report}", lost.join(", "));
}

fn assert_gap_bounded(test: &str, report: &ProbeReport) {
    let tcp = report.tcp.as_ref().expect("a TCP report");
    let longest = tcp
        .longest_gap
        .as_ref()
        .map_or(Duration::ZERO, |g| Duration::from_micros(g.longest_us));
    assert!(
        longest <= LONGEST_GAP,
        "{test}: the longest TCP reply gap {longest:?} exceeds {LONGEST_GAP:?}: {report:?}"
    );
}

#[test]
fn a_tcp_connection_survives_a_postcopy_migration_without_loss() {
    let _serial = serial();
    let test = "a_tcp_connection_survives_a_postcopy_migration_without_loss";
    if !can_run(test) {
        return;
    }
    let report = tcp_survives(
        test,
        "fnpost",
        90,
        &["--mode", "postcopy", "--allow-postcopy", "--json"],
    );
    assert_eq!(report["mode"], "postcopy", "{report:#}");
}

#[test]
fn a_tcp_connection_survives_a_hybrid_migration_without_loss() {
    let _serial = serial();
    let test = "a_tcp_connection_survives_a_hybrid_migration_without_loss";
    if !can_run(test) {
        return;
    }
    // The guest writes 100 MiB/s: under a 40 MiB/s cap pre-copy cannot
    // converge, so hybrid switches to post-copy.
    let report = tcp_survives(
        test,
        "fnhyb",
        91,
        &[
            "--mode",
            "hybrid",
            "--allow-postcopy",
            "--bandwidth",
            "40MiB/s",
            "--json",
        ],
    );
    assert_eq!(report["mode"], "hybrid", "{report:#}");
    assert!(
        report["rounds"].as_array().is_some_and(|r| !r.is_empty()),
        "hybrid starts with pre-copy: {report:#}"
    );
}
