//! Another `ferry` process this one starts and owns (the demo's host B,
//! the bench's source and destination): its stdout (the guest console) for
//! the caller to read, its stderr status lines, and a stop when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a child gets to stop cleanly (and print its report).
const STOP_GRACE: Duration = Duration::from_secs(3);

pub struct FerryChild {
    name: &'static str,
    child: Child,
    stdout: Option<ChildStdout>,
    status: mpsc::Receiver<String>,
}

impl FerryChild {
    pub fn spawn(name: &'static str, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the ferry binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take();
        let status = lines(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            name,
            child,
            stdout,
            status,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest console; can be taken once.
    pub fn take_stdout(&mut self) -> ChildStdout {
        self.stdout.take().expect("stdout is taken once")
    }

    /// Status lines (stderr) that arrived so far.
    pub fn status_so_far(&self) -> Vec<String> {
        self.status.try_iter().collect()
    }

    /// The first status line that starts with `prefix`, without it.
    pub fn wait_status(&self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.status.recv_timeout(left) {
                Ok(line) => {
                    tracing::debug!(name = self.name, %line, "ferry child");
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Err(_) => bail!("{}: no '{prefix}' line within {timeout:?}", self.name),
            }
        }
    }

    /// A `ferry receive` child's address, once it listens.
    pub fn listening_addr(&self, timeout: Duration) -> anyhow::Result<String> {
        self.wait_status("ferry: listening on ", timeout)
    }
}

impl Drop for FerryChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, which has not been reaped (we
        // hold its Child), so the pid cannot name another process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a pipe, as they come, from a thread of their own.
pub fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
