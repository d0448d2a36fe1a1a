//! Real KVM: the dirty log reports exactly the pages the guest's workload
//! rewrites, never pages outside its working set, and nothing while the
//! vCPUs are paused; the VMM's own writes show up too.

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, Line, Ready};
use ferry_testguest::workload::Workload;
use ferry_vmm::{GuestImage, Vm, VmConfig, VmEvent};
use vm_memory::{Bytes, GuestAddress};

fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED {test}: /dev/kvm is not usable here; this test needs real KVM");
    }
    ok
}

fn wait_ready(events: &Receiver<VmEvent>) -> Ready {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(VmEvent::Console(line)) = events.recv_timeout(Duration::from_millis(100)) {
            if let Line::Ready(r) = parse_line(&line.text) {
                return r;
            }
        }
    }
    panic!("guest never became READY");
}

#[test]
fn dirty_log_reports_the_working_set_and_own_writes() {
    if !kvm_or_skip("dirty_log_reports_the_working_set_and_own_writes") {
        return;
    }
    let workload: Workload = "dirty:32:50".parse().unwrap();
    let mut vm = Vm::start(VmConfig {
        mem_bytes: 256 << 20,
        vcpus: 1,
        image: GuestImage::Bytes(ferry_testguest::GUEST_ELF.into()),
        cmdline: ferry_testguest::guest_cmdline(&workload, 1, None),
        prealloc: false,
        net: None,
        block: None,
    })
    .unwrap();
    let events = vm.take_events().unwrap();
    let ready = wait_ready(&events);
    let ws = ready.ws_base..ready.ws_base + (32 << 20);

    vm.set_dirty_logging(true).unwrap();
    vm.harvest_dirty().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let dirty = vm.harvest_dirty().unwrap();
    // 50 MiB/s for 0.4 s is ~5100 pages; the guest's own stack and
    // statistics add a few outside the working set.
    let inside = dirty.gpas().filter(|g| ws.contains(g)).count() as u64;
    let outside: Vec<u64> = dirty.gpas().filter(|g| !ws.contains(g)).collect();
    assert!(
        (3000..=8000).contains(&inside),
        "{inside} working-set pages dirty in 0.4 s at 50 MiB/s"
    );
    assert!(
        outside.len() < 64,
        "unexpected dirty pages outside the working set: {outside:x?}"
    );
    assert!(
        outside.iter().all(|&g| g < ready.ws_base),
        "stray dirty pages above the image"
    );

    // Paused: nothing changes, except what the VMM writes itself.
    vm.pause().unwrap();
    vm.harvest_dirty().unwrap();
    assert_eq!(
        vm.harvest_dirty().unwrap().count(),
        0,
        "a paused guest dirtied memory"
    );
    let own = 200 << 20;
    vm.memory().write_obj(0xabcdu16, GuestAddress(own)).unwrap();
    let dirty = vm.harvest_dirty().unwrap();
    assert_eq!(
        dirty.gpas().collect::<Vec<_>>(),
        vec![own],
        "the VMM's own write must be reported"
    );
    vm.resume();
    vm.set_dirty_logging(false).unwrap();
    vm.stop();
}
