//! A check that cannot fail is not a check: flip bytes in the running
//! guest's working set from outside (through its RAM memfd) and require the
//! guest to report exactly those pages as bad.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, ForeignRam, RunningFerry};
use ferry_testguest::console::Line;

#[test]
fn guest_reports_pages_flipped_by_the_host() {
    if !kvm_or_skip("guest_reports_pages_flipped_by_the_host") {
        return;
    }
    // 64 MiB at 64 MiB/s: one sweep a second, so a flipped page is verified
    // within about a second.
    let mut vm = RunningFerry::spawn(&["--mem", "256M", "--workload", "dirty:64:64"]);
    let ready = vm.wait_for(Duration::from_secs(20), |l| match l {
        Line::Ready(r) => Some(r.clone()),
        _ => None,
    });
    let ram = ForeignRam::open(vm.pid());
    let flipped: Vec<u64> = [3u64, 4000, 9000, 16000]
        .iter()
        .map(|page| ready.ws_base + page * 4096 + 100)
        .collect();
    for &addr in &flipped {
        ram.flip_byte(addr);
    }
    let bad = vm.wait_for(Duration::from_secs(10), |l| match l {
        Line::PageError(e) => Some(e.addr),
        _ => None,
    });
    assert!(
        flipped.iter().any(|&a| a & !4095 == bad),
        "guest reported {bad:#x}, host flipped {flipped:x?}"
    );
    let hb = vm.wait_for(Duration::from_secs(5), |l| match l {
        Line::Heartbeat(hb) if hb.err > 0 => Some(hb.clone()),
        _ => None,
    });
    assert!(hb.err >= 1);
    let (status, console) = vm.stop();
    assert!(
        !status.success(),
        "a run with bad pages must fail: {}",
        console.join("\n")
    );
}
