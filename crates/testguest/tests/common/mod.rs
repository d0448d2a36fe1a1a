//! Shared by the QEMU tests: boot the real test guest under QEMU (PVH
//! entry, ring-0 stub, ring-3 workload) and read its console through the
//! shared parser; skip loudly when the machine cannot run them.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, Line};
use ferry_testguest::guest_elf_path;

pub const TIMEOUT: Duration = Duration::from_secs(30);
pub const QEMU: &str = "qemu-system-x86_64";

/// True when /dev/kvm exists; otherwise says loudly that the test is
/// skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED {test}: /dev/kvm missing: the guest was not booted under QEMU");
    false
}

/// How to start QEMU: the machine, the guest command line, arguments
/// added at the end (devices), and a command to run QEMU under (e.g.
/// `ip netns exec NS`).
pub struct QemuSpec<'a> {
    pub machine: &'a str,
    pub append: &'a str,
    pub extra: Vec<String>,
    pub wrapper: Vec<String>,
}

impl<'a> QemuSpec<'a> {
    pub fn microvm(append: &'a str) -> Self {
        Self {
            machine: "microvm",
            append,
            extra: Vec::new(),
            wrapper: Vec::new(),
        }
    }
}

/// A running QEMU with the guest; killed when dropped.
pub struct Qemu {
    child: Child,
    lines: Receiver<String>,
    /// Lines received but not yet handed out by next().
    backlog: VecDeque<String>,
    pub started: Instant,
    /// Every console line so far, for failure messages.
    seen: Vec<String>,
    timeout: Duration,
}

impl Qemu {
    /// Boots the guest with `append` as its command line; `None` (after a
    /// loud SKIPPED) when this machine has no KVM.
    pub fn boot(append: &str) -> Option<Qemu> {
        if !kvm_or_skip("qemu_boot") {
            return None;
        }
        let mut qemu = Qemu::spawn(&QemuSpec::microvm(append));
        // microvm boots in a fraction of q35's ~3.5 s; fall back if this
        // QEMU cannot do it.
        if let Some(status) = qemu.exited_without_output() {
            eprintln!("QEMU -machine microvm failed ({status}); trying q35");
            qemu = Qemu::spawn(&QemuSpec {
                machine: "q35",
                ..QemuSpec::microvm(append)
            });
        }
        Some(qemu)
    }

    pub fn spawn(spec: &QemuSpec) -> Qemu {
        let started = Instant::now();
        let (program, mut command) = match spec.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(QEMU);
                (program.as_str(), c)
            }
            None => (QEMU, Command::new(QEMU)),
        };
        command
            .args([
                "-accel",
                "kvm",
                "-machine",
                spec.machine,
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                "512M",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ])
            // The guest's EXIT writes its code to port 0x501: make QEMU stop
            // there too (QEMU then exits with status code * 2 + 1).
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
            .arg("-kernel")
            .arg(guest_elf_path())
            .args(["-append", spec.append])
            .args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {program} ({e}): install QEMU with scripts/setup.sh (Debian package qemu-system-x86)")
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
            timeout: TIMEOUT,
        }
    }

    /// If QEMU stops without printing anything (e.g. an unknown machine
    /// type), its exit status. A first line read here is kept for next().
    pub fn exited_without_output(&mut self) -> Option<ExitStatus> {
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
    /// Panics (with everything seen so far) past the timeout.
    pub fn next(&mut self) -> Option<Line> {
        self.next_raw().map(|line| parse_line(&line))
    }

    /// The next console line as printed; `None` once QEMU has stopped.
    pub fn next_raw(&mut self) -> Option<String> {
        let line = match self.backlog.pop_front() {
            Some(line) => line,
            None => match self
                .lines
                .recv_timeout(self.timeout.saturating_sub(self.started.elapsed()))
            {
                Ok(line) => line,
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the guest did not finish within {:?}; console:\n{}",
                        self.timeout,
                        self.console()
                    )
                }
            },
        };
        self.seen.push(line.clone());
        Some(line)
    }

    /// Waits for QEMU to exit (it should be stopping) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = self.started + self.timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for QEMU") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not exit within {:?}; console:\n{}",
                self.timeout,
                self.console()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn console(&self) -> String {
        self.seen.concat()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the guest until it prints EXIT; returns that line's code and
/// reason, and QEMU's exit status.
pub fn run_to_exit(spec: &QemuSpec) -> (u64, String, ExitStatus) {
    let mut qemu = Qemu::spawn(spec);
    loop {
        match qemu.next() {
            Some(Line::Exit(exit)) => {
                let status = qemu.wait_exit();
                return (exit.code, exit.reason, status);
            }
            Some(Line::Heartbeat(hb)) => {
                panic!("the guest runs ({hb:?}); console:\n{}", qemu.console())
            }
            Some(_) => {}
            None => panic!("QEMU stopped without EXIT; console:\n{}", qemu.console()),
        }
    }
}
