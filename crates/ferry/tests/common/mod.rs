//! Shared by the real-KVM tests: skip loudly without /dev/kvm, run `ferry`
//! as a separate process, read its guest's console through the test
//! guest's one parser, and reach the guest's RAM from outside.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, Line};

/// True when /dev/kvm is usable; otherwise says loudly that the test is
/// skipped (never a silent pass).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "SKIPPED {test}: /dev/kvm is not usable here ({e}); this test needs real KVM"
            );
            println!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A `ferry run` child whose stdout lines arrive parsed.
pub struct RunningFerry {
    pub child: Child,
    pub lines: Receiver<(String, Line)>,
    pub seen: Vec<String>,
}

impl RunningFerry {
    /// `ferry run ARGS`.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_command("run", args)
    }

    /// `ferry COMMAND ARGS` for a command that runs a VM (run, restore).
    pub fn spawn_command(command: &str, args: &[&str]) -> Self {
        let mut child = ferry()
            .arg(command)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry run");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let parsed = parse_line(&line);
                if tx.send((line, parsed)).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line `pick` accepts; panics with the console so far if
    /// none comes within `timeout`.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Line) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((text, line)) => {
                    self.seen.push(text);
                    if let Some(v) = pick(&line) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "timed out after {timeout:?}; console so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to end by itself (e.g. after `snapshot --stop`).
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader thread ends at EOF; collect what it still has.
                while let Ok((text, _)) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(text);
                }
                return (status, std::mem::take(&mut self.seen));
            }
            assert!(
                Instant::now() < deadline,
                "ferry did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks ferry to stop (SIGTERM, as Ctrl-C would) and waits for it.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for ferry");
        self.seen.extend(self.lines.try_iter().map(|(t, _)| t));
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for RunningFerry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Maps the guest RAM memfd of process `pid` (shared, writable), found
/// through /proc: how a test reaches into a running guest from outside.
pub struct ForeignRam {
    ptr: *mut u8,
    len: usize,
}

impl ForeignRam {
    pub fn open(pid: u32) -> Self {
        let dir = format!("/proc/{pid}/fd");
        for entry in std::fs::read_dir(&dir).expect("list fds") {
            let path = entry.unwrap().path();
            let Ok(target) = std::fs::read_link(&path) else {
                continue;
            };
            if !target.to_string_lossy().contains("memfd:ferry-guest-ram") {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open guest memfd");
            let len = file.metadata().unwrap().len() as usize;
            use std::os::fd::AsRawFd;
            // SAFETY: mapping a file we opened, shared, for its full length;
            // the mapping is unmapped in Drop and never outlives `self`.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memfd");
            return Self {
                ptr: ptr.cast(),
                len,
            };
        }
        panic!("no ferry-guest-ram memfd in {dir}");
    }

    /// Flips the bits of one byte at guest-physical `addr` (below 3 GiB).
    pub fn flip_byte(&self, addr: u64) {
        assert!((addr as usize) < self.len);
        // SAFETY: addr is inside the mapping; a volatile access because the
        // guest writes the same memory concurrently.
        unsafe {
            let p = self.ptr.add(addr as usize);
            p.write_volatile(!p.read_volatile());
        }
    }
}

impl Drop for ForeignRam {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A fresh directory for one test's files, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, file: &str) -> String {
        self.0.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ferry snapshot SOCKET FILE [extra]`: its exit status and output.
pub fn snapshot(socket: &str, file: &str, extra: &[&str]) -> std::process::Output {
    ferry()
        .args(["snapshot", socket, file])
        .args(extra)
        .output()
        .expect("run ferry snapshot")
}

/// Waits until `socket` accepts connections (the API is up).
pub fn wait_for_socket(socket: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "API socket {socket} never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next heartbeat, or a panic with the console so far.
pub fn next_heartbeat(
    vm: &mut RunningFerry,
    timeout: Duration,
) -> ferry_testguest::console::Heartbeat {
    vm.wait_for(timeout, |l| match l {
        Line::Heartbeat(hb) => Some(hb.clone()),
        _ => None,
    })
}

/// `ferry run` with an API socket in `dir`, waited for until the guest is
/// READY and the socket answers.
pub fn ready_vm_with_api(
    dir: &TempDir,
    mem: &str,
    vcpus: &str,
    workload: &str,
) -> (RunningFerry, String) {
    let socket = dir.path("vm.sock");
    let mut vm = RunningFerry::spawn(&[
        "--mem",
        mem,
        "--vcpus",
        vcpus,
        "--workload",
        workload,
        "--api",
        &socket,
    ]);
    vm.wait_for(Duration::from_secs(30), |l| {
        matches!(l, Line::Ready(_)).then_some(())
    });
    wait_for_socket(&socket);
    (vm, socket)
}
