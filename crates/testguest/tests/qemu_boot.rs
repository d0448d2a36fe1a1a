//! Boots the real test guest under QEMU (PVH entry, ring-0 stub, ring-3
//! workload) and checks what it prints through the shared console parser.
//!
//! Without /dev/kvm the tests say `SKIPPED` loudly and return; without
//! QEMU they fail and say how to install it. A hung guest fails the test
//! after `common::TIMEOUT` instead of hanging it.

mod common;

use std::time::Duration;

use common::{run_to_exit as run_spec_to_exit, Qemu, QemuSpec};
use ferry_testguest::console::{exit_code, Heartbeat, Line};
use ferry_testguest::guest_ws_base;

/// What a run printed, in order.
#[derive(Default)]
struct Seen {
    boot: Option<ferry_testguest::console::Boot>,
    ready: Option<ferry_testguest::console::Ready>,
    /// Heartbeats, and whether READY had been seen when each arrived.
    heartbeats: Vec<(Heartbeat, bool)>,
    first_hb_after: Option<Duration>,
}

/// Reads lines until `done` says enough; fails on ERR, EXIT or output
/// before the FERRY-GUEST line.
fn watch(qemu: &mut Qemu, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut seen = Seen::default();
    while !done(&seen) {
        let Some(line) = qemu.next() else {
            panic!("QEMU stopped early; console:\n{}", qemu.console());
        };
        match line {
            Line::Boot(b) => {
                assert!(
                    seen.boot.is_none(),
                    "two FERRY-GUEST lines; console:\n{}",
                    qemu.console()
                );
                seen.boot = Some(b);
            }
            _ if seen.boot.is_none() => {
                // Firmware may print before the guest; the guest itself prints
                // nothing before FERRY-GUEST.
                assert!(
                    matches!(line, Line::Other(_)),
                    "{line:?} before FERRY-GUEST; console:\n{}",
                    qemu.console()
                );
            }
            Line::Ready(r) => {
                assert!(
                    seen.ready.is_none(),
                    "two READY lines; console:\n{}",
                    qemu.console()
                );
                seen.ready = Some(r);
            }
            Line::Heartbeat(hb) => {
                seen.first_hb_after.get_or_insert(qemu.started.elapsed());
                seen.heartbeats.push((hb, seen.ready.is_some()));
            }
            Line::PageError(_) | Line::Exit(_) => {
                panic!("unexpected {line:?}; console:\n{}", qemu.console())
            }
            Line::Other(_) => {}
        }
    }
    seen
}

/// Checks what holds for every run: heartbeats numbered from 0 without a
/// gap, no page errors.
fn check_heartbeats(qemu: &Qemu, seen: &Seen) {
    for (i, (hb, _)) in seen.heartbeats.iter().enumerate() {
        assert_eq!(
            hb.seq,
            i as u64,
            "heartbeat numbering; console:\n{}",
            qemu.console()
        );
        assert_eq!(
            hb.err,
            0,
            "the guest found bad pages; console:\n{}",
            qemu.console()
        );
    }
}

#[test]
fn dirty_workload_verifies_its_pages_and_beats() {
    let Some(mut qemu) = Qemu::boot("workload=dirty:64:100") else {
        return;
    };
    let seen = watch(&mut qemu, |s| {
        let after: Vec<_> = s.heartbeats.iter().filter(|(_, ready)| *ready).collect();
        after.len() >= 5 && after.last().is_some_and(|(hb, _)| hb.sweeps >= 1)
    });
    eprintln!(
        "QEMU start to first HB: {:?}",
        seen.first_hb_after.expect("heartbeats seen")
    );
    check_heartbeats(&qemu, &seen);

    let boot = seen.boot.as_ref().expect("FERRY-GUEST seen");
    assert_eq!((boot.version, boot.cpus), (1, 1));
    assert!(
        boot.tsc_khz > 100_000,
        "calibrated TSC: {} kHz",
        boot.tsc_khz
    );
    assert_eq!(boot.cmdline, "workload=dirty:64:100");

    let ready = seen.ready.as_ref().expect("READY seen");
    assert_eq!(
        (ready.ws_mb, ready.rate, ready.fill_mb, ready.cpus),
        (64, Some(100), 0, 1)
    );
    assert_eq!(ready.ws_base, guest_ws_base());
    assert_eq!(ready.fill_base, ready.ws_base + (64 << 20));

    // After READY every heartbeat has verified more pages than the one
    // before, and the writer holds its rate (100 MiB/s plus a small burst).
    let after: Vec<&Heartbeat> = seen
        .heartbeats
        .iter()
        .filter(|(_, ready)| *ready)
        .map(|(hb, _)| hb)
        .collect();
    for pair in after.windows(2) {
        assert!(
            pair[1].ver > pair[0].ver,
            "ver must rise: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    let (first, last) = (after[0], after[after.len() - 1]);
    let mib = (last.wr - first.wr) as f64 / 256.0;
    let secs = (last.t_ms - first.t_ms) as f64 / 1000.0;
    let rate = mib / secs;
    assert!(
        (20.0..=125.0).contains(&rate),
        "written at {rate:.1} MiB/s, want about 100"
    );
    assert!(last.sweeps >= 1);
}

#[test]
fn idle_workload_beats_without_writing() {
    let Some(mut qemu) = Qemu::boot("workload=idle cpus=1") else {
        return;
    };
    let seen = watch(&mut qemu, |s| {
        s.heartbeats.iter().filter(|(_, ready)| *ready).count() >= 3
    });
    check_heartbeats(&qemu, &seen);
    let ready = seen.ready.as_ref().expect("READY seen");
    assert_eq!((ready.ws_mb, ready.rate, ready.fill_mb), (0, Some(0), 0));
    for (hb, _) in &seen.heartbeats {
        assert_eq!(
            (hb.wr, hb.ver, hb.sweeps, hb.rate_mibs),
            (0, 0, 0, 0),
            "{hb:?}"
        );
    }
}

/// Runs the guest until it prints EXIT; `None` (after a loud SKIPPED)
/// without KVM.
fn run_to_exit(append: &str) -> Option<(u64, String, std::process::ExitStatus)> {
    common::kvm_or_skip("qemu_boot").then(|| run_spec_to_exit(&QemuSpec::microvm(append)))
}

#[test]
fn workload_larger_than_ram_exits() {
    let Some((code, reason, status)) = run_to_exit("workload=dirty:400:100:200") else {
        return;
    };
    assert_eq!(code, exit_code::NO_FIT, "{reason}");
    assert!(reason.contains("does not fit"), "{reason}");
    // isa-debug-exit: QEMU's status is code * 2 + 1.
    assert_eq!(status.code(), Some(2 * exit_code::NO_FIT as i32 + 1));
}

#[test]
fn bad_command_line_exits() {
    let Some((code, reason, _)) = run_to_exit("workload=dirty:64:fast") else {
        return;
    };
    assert_eq!(code, exit_code::BAD_CMDLINE, "{reason}");
    assert!(
        reason.contains("RATE") && reason.contains("workload=dirty:64:fast"),
        "{reason}"
    );
}
