//! Boots the real test guest under QEMU (PVH entry, ring-0 stub, ring-3
//! workload) and checks what it prints through the shared console parser.
//!
//! Without /dev/kvm the tests say `SKIPPED` loudly and return; without
//! QEMU they fail and say how to install it. A hung guest fails the test
//! after [`TIMEOUT`] instead of hanging it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_testguest::console::{exit_code, parse_line, Heartbeat, Line};
use ferry_testguest::{guest_elf_path, guest_ws_base};

const TIMEOUT: Duration = Duration::from_secs(30);
const QEMU: &str = "qemu-system-x86_64";

/// A running QEMU with the guest; killed when dropped.
struct Qemu {
    child: Child,
    lines: Receiver<String>,
    /// Lines received but not yet handed out by next().
    backlog: VecDeque<String>,
    started: Instant,
    /// Every console line so far, for failure messages.
    seen: Vec<String>,
}

impl Qemu {
    /// Boots the guest with `append` as its command line; `None` (after a
    /// loud SKIPPED) when this machine has no KVM.
    fn boot(append: &str) -> Option<Qemu> {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm missing: the guest was not booted under QEMU");
            return None;
        }
        let mut qemu = Qemu::spawn("microvm", append);
        // microvm boots in a fraction of q35's ~3.5 s; fall back if this
        // QEMU cannot do it.
        if let Some(status) = qemu.exited_without_output() {
            eprintln!("QEMU -machine microvm failed ({status}); trying q35");
            qemu = Qemu::spawn("q35", append);
        }
        Some(qemu)
    }

    fn spawn(machine: &str, append: &str) -> Qemu {
        let started = Instant::now();
        let mut child = Command::new(QEMU)
            .args(["-accel", "kvm", "-machine", machine, "-cpu", "host,-arch-capabilities", "-m", "512M"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
            // The guest's EXIT writes its code to port 0x501: make QEMU stop
            // there too (QEMU then exits with status code * 2 + 1).
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
            .arg("-kernel")
            .arg(guest_elf_path())
            .args(["-append", append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {QEMU} ({e}): install QEMU with scripts/setup.sh (Debian package qemu-system-x86)")
            });
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                    break;
                }
                buf.clear();
            }
        });
        Qemu {
            child,
            lines,
            backlog: VecDeque::new(),
            started,
            seen: Vec::new(),
        }
    }

    /// If QEMU stops without printing anything (e.g. an unknown machine
    /// type), its exit status. A first line read here is kept for next().
    fn exited_without_output(&mut self) -> Option<ExitStatus> {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                self.backlog.push_back(line);
                None
            }
            // The reader saw end of file: QEMU is gone.
            Err(RecvTimeoutError::Disconnected) => Some(self.wait_exit()),
            // Slow, but running: next() keeps watching the clock.
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// The next console line, parsed; `None` once QEMU has stopped.
    /// Panics (with everything seen so far) past [`TIMEOUT`].
    fn next(&mut self) -> Option<Line> {
        let line = match self.backlog.pop_front() {
            Some(line) => line,
            None => match self
                .lines
                .recv_timeout(TIMEOUT.saturating_sub(self.started.elapsed()))
            {
                Ok(line) => line,
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the guest did not finish within {TIMEOUT:?}; console:\n{}",
                        self.console()
                    )
                }
            },
        };
        let parsed = parse_line(&line);
        self.seen.push(line);
        Some(parsed)
    }

    /// Waits for QEMU to exit (it should be stopping) and returns its status.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = self.started + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for QEMU") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not exit within {TIMEOUT:?}; console:\n{}",
                self.console()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn console(&self) -> String {
        self.seen.concat()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// Runs the guest until it prints EXIT; returns that line's code and
/// reason, and QEMU's exit status.
fn run_to_exit(append: &str) -> Option<(u64, String, ExitStatus)> {
    let mut qemu = Qemu::boot(append)?;
    loop {
        match qemu.next() {
            Some(Line::Exit(exit)) => {
                let status = qemu.wait_exit();
                return Some((exit.code, exit.reason, status));
            }
            Some(Line::Heartbeat(hb)) => {
                panic!("the guest runs ({hb:?}); console:\n{}", qemu.console())
            }
            Some(_) => {}
            None => panic!("QEMU stopped without EXIT; console:\n{}", qemu.console()),
        }
    }
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
