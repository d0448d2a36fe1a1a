//! Shared by the real-KVM tests: skip loudly without /dev/kvm, run `ferry`
//! as a separate process, read its guest's console through the test
//! guest's one parser, and reach the guest's RAM from outside.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
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

// ---------------------------------------------------------------------------
// Live migration: `ferry run`, `ferry receive` and `ferry migrate` as separate
// processes whose stdout and stderr are both read line by line.

/// Which output stream of a child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

/// A `ferry` child with both output streams captured (stderr lines are also
/// echoed, prefixed with the child's name, for the test log). Killed on drop.
pub struct FerryProc {
    pub name: String,
    pub child: Child,
    lines: Receiver<(Stream, Option<String>)>,
    /// Every stdout line read so far (the guest console, reports).
    pub out: Vec<String>,
    /// Every stderr line read so far.
    pub err: Vec<String>,
    open_streams: usize,
    status: Option<std::process::ExitStatus>,
}

impl FerryProc {
    /// `ferry ARGS`, named `name` in the log.
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(name, args, &[])
    }

    /// `ferry ARGS` with `env` added to its environment.
    pub fn spawn_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = ferry()
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ferry {args:?}: {e}"));
        let (tx, rx) = channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx_out = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx_out.send((Stream::Out, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx_out.send((Stream::Out, None));
        });
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                if tx.send((Stream::Err, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((Stream::Err, None));
        });
        eprintln!("[{name}] started: ferry {}", args.join(" "));
        Self {
            name: name.to_owned(),
            child,
            lines: rx,
            out: Vec::new(),
            err: Vec::new(),
            open_streams: 2,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything read so far, for failure messages.
    pub fn transcript(&self) -> String {
        let tail = |v: &[String]| v[v.len().saturating_sub(60)..].join("\n");
        format!(
            "--- {} stdout (last 60 lines) ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.out),
            self.name,
            self.err.join("\n")
        )
    }

    fn record(&mut self, stream: Stream, line: Option<String>) -> Option<(Stream, String)> {
        match line {
            None => {
                self.open_streams -= 1;
                None
            }
            Some(text) => {
                match stream {
                    Stream::Out => self.out.push(text.clone()),
                    Stream::Err => self.err.push(text.clone()),
                }
                Some((stream, text))
            }
        }
    }

    /// Reads lines until `pick` accepts one; panics with the transcript if
    /// none comes within `timeout` or both streams end first.
    pub fn wait_line<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(Stream, &str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if self.open_streams == 0 {
                panic!(
                    "{}: waiting for {what}: the process closed its output ({:?})\n{}",
                    self.name,
                    self.child.try_wait(),
                    self.transcript()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((stream, line)) => {
                    if let Some((stream, text)) = self.record(stream, line) {
                        if let Some(v) = pick(stream, &text) {
                            return v;
                        }
                    }
                }
                Err(_) => panic!(
                    "{}: no {what} within {timeout:?}\n{}",
                    self.name,
                    self.transcript()
                ),
            }
        }
    }

    /// The next stdout line that is a heartbeat.
    pub fn next_heartbeat(&mut self, timeout: Duration) -> ferry_testguest::console::Heartbeat {
        self.wait_line(timeout, "heartbeat", |s, text| {
            match (s, parse_line(text)) {
                (Stream::Out, Line::Heartbeat(hb)) => Some(hb),
                _ => None,
            }
        })
    }

    /// Reads whatever has arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok((stream, line)) = self.lines.try_recv() {
            self.record(stream, line);
        }
    }

    /// Waits for the process to exit by itself and for the end of both its
    /// streams; panics if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.status {
                break s;
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                break s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.transcript()
                );
            }
            if let Ok((stream, line)) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.record(stream, line);
            }
        };
        // The streams end when the process (and anything that inherited
        // them) is gone; bounded anyway.
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while self.open_streams > 0 {
            let left = drain_deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((stream, line)) => {
                    self.record(stream, line);
                }
                Err(_) => break,
            }
        }
        eprintln!("[{}] exited: {status}", self.name);
        status
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        if self.status.is_none() {
            let _ = self.child.kill();
        }
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGTERM (as Ctrl-C would: ferry stops the VM and prints its report),
    /// then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child's pid with a valid signal.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        self.wait_exit(timeout)
    }

    /// All heartbeats on stdout so far, in order.
    pub fn heartbeats(&self) -> Vec<ferry_testguest::console::Heartbeat> {
        self.out
            .iter()
            .filter_map(|l| match parse_line(l) {
                Line::Heartbeat(hb) => Some(hb),
                _ => None,
            })
            .collect()
    }

    /// `ERR` lines (pages that failed the guest's verification) so far.
    pub fn page_errors(&self) -> Vec<String> {
        self.out
            .iter()
            .filter(|l| matches!(parse_line(l), Line::PageError(_)))
            .cloned()
            .collect()
    }

    /// The JSON document a `--json` command printed last on stdout (from
    /// the last line that is exactly `{`).
    pub fn json_report(&self) -> serde_json::Value {
        let start = self
            .out
            .iter()
            .rposition(|l| l == "{")
            .unwrap_or_else(|| panic!("{}: no JSON report\n{}", self.name, self.transcript()));
        let text = self.out[start..].join("\n");
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{}: the JSON report does not parse: {e}\n{text}", self.name)
        })
    }

    pub fn stderr_text(&self) -> String {
        self.err.join("\n")
    }
}

impl Drop for FerryProc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ferry run --mem MEM --vcpus VCPUS --workload WORKLOAD --api DIR/NAME.sock`,
/// waited for until the guest is READY and the API socket answers.
pub fn migration_source(
    dir: &TempDir,
    name: &str,
    mem: &str,
    vcpus: &str,
    workload: &str,
) -> (FerryProc, String) {
    let socket = dir.path(&format!("{name}.sock"));
    let mut vm = FerryProc::spawn(
        name,
        &[
            "run",
            "--mem",
            mem,
            "--vcpus",
            vcpus,
            "--workload",
            workload,
            "--api",
            &socket,
            "--duration",
            "300s",
        ],
    );
    vm.wait_line(Duration::from_secs(60), "READY", |s, text| {
        (s == Stream::Out && matches!(parse_line(text), Line::Ready(_))).then_some(())
    });
    wait_for_socket(&socket);
    (vm, socket)
}

/// `ferry receive --listen 127.0.0.1:0 ARGS`; returns it with the port it
/// printed.
pub fn migration_destination(name: &str, args: &[&str]) -> (FerryProc, u16) {
    migration_destination_with_env(name, args, &[])
}

/// [`migration_destination`] with `env` added to its environment.
pub fn migration_destination_with_env(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (FerryProc, u16) {
    let mut all = vec!["receive", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    if !args.contains(&"--tls") && !args.contains(&"--insecure-plaintext") {
        all.push("--insecure-plaintext");
    }
    let mut dst = FerryProc::spawn_with_env(name, &all, env);
    let port = dst.wait_line(Duration::from_secs(20), "the listening port", |s, text| {
        let rest = text.strip_prefix("ferry: listening on ")?;
        (s == Stream::Err).then_some(())?;
        rest.trim().rsplit(':').next()?.parse::<u16>().ok()
    });
    (dst, port)
}

/// `ferry receive` with an API socket DIR/NAME.sock, so the VM it gets can
/// be migrated on; stops by itself after 300 s at the latest.
pub fn migration_destination_with_api(dir: &TempDir, name: &str) -> (FerryProc, u16, String) {
    let socket = dir.path(&format!("{name}.sock"));
    let (dst, port) =
        migration_destination(name, &["--api", &socket, "--duration", "300s", "--json"]);
    (dst, port, socket)
}

/// `ferry migrate SOCKET --to 127.0.0.1:PORT ARGS`, running.
pub fn start_migrate(name: &str, socket: &str, port: u16, args: &[&str]) -> FerryProc {
    let to = format!("127.0.0.1:{port}");
    let mut all = vec!["migrate", socket, "--to", &to];
    all.extend_from_slice(args);
    if !["--tls", "--resume", "--insecure-plaintext"]
        .iter()
        .any(|flag| args.contains(flag))
    {
        all.push("--insecure-plaintext");
    }
    FerryProc::spawn(name, &all)
}

/// The destination's guest must continue exactly where the source's
/// stopped (`first.seq == last_source.seq + 1`), with no error, and then
/// complete a whole sweep of its working set on the destination (`sweeps`
/// up by 2 over the first heartbeat there). Returns the first and the last
/// heartbeat read.
pub fn verify_arrival(
    dst: &mut FerryProc,
    last_source: &ferry_testguest::console::Heartbeat,
    timeout: Duration,
) -> (
    ferry_testguest::console::Heartbeat,
    ferry_testguest::console::Heartbeat,
) {
    let deadline = Instant::now() + timeout;
    let first = dst.next_heartbeat(Duration::from_secs(20));
    assert_eq!(
        first.seq,
        last_source.seq + 1,
        "the destination's first heartbeat must continue the source's sequence \
         (source's last {last_source:?}, destination's first {first:?})\n{}",
        dst.transcript()
    );
    assert!(
        first.wr >= last_source.wr && first.ver >= last_source.ver,
        "the guest's counters went backwards: {last_source:?} then {first:?}"
    );
    assert!(
        first.t_ms >= last_source.t_ms,
        "the guest clock went backwards"
    );
    assert_eq!(
        first.err,
        0,
        "errors on arrival: {first:?}\n{}",
        dst.transcript()
    );
    let target = first.sweeps + 2;
    let mut prev = first.clone();
    let last = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{}: no full sweep on the destination within {timeout:?} (from {first:?} to {prev:?})",
            dst.name
        );
        let hb = dst.next_heartbeat(left);
        assert_eq!(
            hb.seq,
            prev.seq + 1,
            "heartbeat sequence broke on {}",
            dst.name
        );
        assert_eq!(
            hb.err,
            0,
            "bad pages on the destination: {hb:?}\n{}",
            dst.transcript()
        );
        prev = hb.clone();
        if hb.sweeps >= target {
            break hb;
        }
    };
    let errs = dst.page_errors();
    assert!(errs.is_empty(), "ERR lines on {}: {errs:?}", dst.name);
    eprintln!(
        "[{}] verified: seq {} -> {} (source's last {}), sweeps {} -> {}, err 0, first stall {} us",
        dst.name, first.seq, last.seq, last_source.seq, first.sweeps, last.sweeps, first.stall_us
    );
    (first, last)
}

/// The VM still runs here and still verifies its memory: heartbeats keep
/// coming in sequence from the next one on, `err=0`, writing (never a
/// second without a write), until at least one more whole sweep (`sweeps`
/// up by 2). Returns the heartbeats read.
pub fn verify_still_running(
    vm: &mut FerryProc,
    timeout: Duration,
) -> Vec<ferry_testguest::console::Heartbeat> {
    let deadline = Instant::now() + timeout;
    let first = vm.next_heartbeat(Duration::from_secs(10));
    assert_eq!(first.err, 0, "bad pages on {}: {first:?}", vm.name);
    let target = first.sweeps + 2;
    let mut seen = vec![first.clone()];
    let mut last_write = first.clone();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{}: no full sweep within {timeout:?} (from {first:?} to {:?})",
            vm.name,
            seen.last()
        );
        let hb = vm.next_heartbeat(left.min(Duration::from_secs(10)));
        let prev = seen.last().unwrap();
        assert_eq!(
            hb.seq,
            prev.seq + 1,
            "heartbeat sequence broke on {}",
            vm.name
        );
        // A guest whose disk request waits on a busy host writes no
        // memory for a heartbeat or two; one that writes nothing for a
        // second has stopped.
        if hb.wr > prev.wr {
            last_write = hb.clone();
        }
        assert!(
            hb.t_ms.saturating_sub(last_write.t_ms) < 1000,
            "{} stopped writing: {last_write:?} then {hb:?}",
            vm.name
        );
        assert_eq!(
            hb.err,
            0,
            "bad pages on {}: {hb:?}\n{}",
            vm.name,
            vm.transcript()
        );
        let done = hb.sweeps >= target;
        seen.push(hb);
        if done {
            break;
        }
    }
    let errs = vm.page_errors();
    assert!(errs.is_empty(), "ERR lines on {}: {errs:?}", vm.name);
    let last = seen.last().unwrap();
    eprintln!(
        "[{}] still running and verified: seq {} -> {}, sweeps {} -> {}, err 0",
        vm.name, first.seq, last.seq, first.sweeps, last.sweeps
    );
    seen
}
pub mod disk;
pub mod migrations;
pub mod net;

/// Runs `cmd` to its end within `timeout` (killed past it); returns its
/// pid, exit success, stdout and stderr.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> (u32, bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ferry bench");
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (out_reader.join().unwrap(), err_reader.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!("ferry bench did not finish within {timeout:?}; stderr:\n{stderr}")
    });
    (pid, status.success(), stdout, stderr)
}
