//! Real KVM: the test guest boots under Ferry, heartbeats, and verifies its
//! working set with no errors, on one vCPU and on two.

mod common;

use std::time::Duration;

use common::{kvm_or_skip, RunningFerry};
use ferry_testguest::console::Line;

fn boots_and_verifies(vcpus: &str) {
    let mut vm = RunningFerry::spawn(&[
        "--mem",
        "512M",
        "--vcpus",
        vcpus,
        "--workload",
        "dirty:64:200",
    ]);
    let boot = vm.wait_for(Duration::from_secs(10), |l| match l {
        Line::Boot(b) => Some(b.clone()),
        _ => None,
    });
    assert_eq!(boot.cpus.to_string(), vcpus);
    vm.wait_for(Duration::from_secs(20), |l| {
        matches!(l, Line::Ready(_)).then_some(())
    });
    let mut last_ver = 0;
    let mut rises = 0;
    let mut last_seq = None;
    let mut sweeps = 0;
    while rises < 5 || sweeps < 1 {
        let hb = vm.wait_for(Duration::from_secs(5), |l| match l {
            Line::Heartbeat(hb) => Some(hb.clone()),
            _ => None,
        });
        assert_eq!(hb.err, 0, "the guest found bad pages: {:?}", vm.seen);
        if let Some(prev) = last_seq {
            assert_eq!(hb.seq, prev + 1, "heartbeat sequence must not skip");
        }
        last_seq = Some(hb.seq);
        if hb.ver > last_ver {
            rises += 1;
        }
        last_ver = hb.ver;
        sweeps = hb.sweeps;
    }
    let (status, console) = vm.stop();
    assert!(
        status.success(),
        "ferry run must end cleanly on SIGTERM: {status:?}\n{}",
        console.join("\n")
    );
    assert!(
        console
            .iter()
            .any(|l| l.contains("verdict") && l.contains("ok")),
        "{}",
        console.join("\n")
    );
}

#[test]
fn one_vcpu_boots_and_verifies() {
    if kvm_or_skip("one_vcpu_boots_and_verifies") {
        boots_and_verifies("1");
    }
}

#[test]
fn two_vcpus_boot_and_verify() {
    if kvm_or_skip("two_vcpus_boot_and_verify") {
        boots_and_verifies("2");
    }
}
