//! One `ferry run` process per VM: started detached (its own session,
//! stdin null, console and messages to a log file) so it outlives the
//! agent; watched through a pidfd, which works the same for a child of
//! this agent and for a VMM adopted from a previous one; stopped with
//! SIGTERM, then SIGKILL.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::{Request, Response};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;

use crate::model::VmDefinition;

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot create the log {}: {source}", .path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", .bin.display())]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    #[error("process {pid} is not the VMM we started (its start time differs: pid reused)")]
    Reused { pid: u32 },
    #[error("cannot watch process {pid}: {source}")]
    Pidfd { pid: u32, source: std::io::Error },
    #[error("signal to process {pid}: {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("the VMM did not answer: {0}")]
    Api(String),
    #[error("the VMM exited while starting ({status}): {last_words}")]
    DiedStarting { status: String, last_words: String },
    #[error("the VMM did not answer on its API socket within {0:?}")]
    StartTimeout(Duration),
}

/// The kernel's facts about a pid from /proc/PID/stat: its state letter
/// and its start time in clock ticks since boot (field 22).
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=22 follow the state (field 3): start time is the 19th.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// A VMM process being supervised: a pidfd opened once its identity was
/// checked, so every later signal reaches that process and no other.
pub struct Vmm {
    pub pid: u32,
    pub start_time: u64,
    pidfd: Arc<OwnedFd>,
    /// Present when this agent started it: reaped through it.
    child: Option<Child>,
}

/// What others hold of a supervised VMM while its watcher waits on it:
/// enough to signal it, never to reap it.
#[derive(Clone)]
pub struct VmmHandle {
    pub pid: u32,
    pidfd: Arc<OwnedFd>,
}

impl VmmHandle {
    /// Sends `sig` to this very process (never to a reuse of its pid).
    pub fn signal(&self, sig: Signal) -> Result<(), SuperviseError> {
        pidfd_send_signal(self.pidfd.as_fd(), sig).map_err(|e| SuperviseError::Signal {
            pid: self.pid,
            source: e.into(),
        })
    }
}

/// How a VMM ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// A clean exit (status 0); false for a signal, a failure, or unknown.
    pub clean: bool,
    pub description: String,
}

impl Vmm {
    /// Starts `ferry run` for `def` with its API at `socket`, console and
    /// messages appended to `log`; `net`: its card's `--net` value.
    pub fn spawn(
        ferry_bin: &Path,
        def: &VmDefinition,
        net: Option<&str>,
        socket: &Path,
        log: &Path,
    ) -> Result<Self, SuperviseError> {
        let mut cmd = Command::new(ferry_bin);
        cmd.arg("run")
            .arg("--mem")
            .arg(format!("{}M", def.mem_bytes >> 20))
            .arg("--vcpus")
            .arg(def.vcpus.to_string())
            .arg("--workload")
            .arg(&def.workload)
            .arg("--api")
            .arg(socket);
        if let Some(guest) = &def.guest {
            cmd.arg("--guest").arg(guest);
        }
        if def.prealloc {
            cmd.arg("--prealloc");
        }
        if let Some(net) = net {
            cmd.arg("--net").arg(net);
        }
        if let Some(disk) = &def.disk {
            cmd.arg("--disk").arg(disk.flag());
        }
        Self::spawn_detached(cmd, ferry_bin, log)
    }

    /// Starts `ferry receive` for an incoming migration of a VM shaped
    /// like `def`: listening on `ip` (a free port, which it prints in
    /// `log`), its memory reserved before the source connects, refusing a
    /// larger VM than the one prepared for, its API at `socket`.
    /// Every connection must open with the session token in `token_file`;
    /// over mutual TLS (`security`) only the prepared source host is taken.
    /// `net`: the `--net` value of the tap prepared for the VM's card.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_receiver(
        ferry_bin: &Path,
        def: &VmDefinition,
        net: Option<&str>,
        ip: std::net::IpAddr,
        socket: &Path,
        log: &Path,
        security: &ReceiverSecurity,
        token_file: &Path,
    ) -> Result<Self, SuperviseError> {
        let mem = format!("{}M", def.mem_bytes >> 20);
        let mut cmd = Command::new(ferry_bin);
        cmd.arg("receive")
            .arg("--listen")
            .arg(std::net::SocketAddr::new(ip, 0).to_string())
            .arg("--mem")
            .arg(&mem)
            .arg("--max-mem")
            .arg(&mem)
            .arg("--max-vcpus")
            .arg(def.vcpus.to_string())
            .arg("--api")
            .arg(socket)
            .arg("--token-file")
            .arg(token_file);
        match security {
            ReceiverSecurity::MutualTls { dir, source } => {
                cmd.arg("--tls").arg(dir).arg("--allow-source").arg(source);
            }
            // Prepared only when both agents allow a plaintext data plane
            // (`insecure_plaintext_data_plane`).
            ReceiverSecurity::Plaintext => {
                cmd.arg("--insecure-plaintext");
            }
        }
        if def.prealloc {
            cmd.arg("--prealloc");
        }
        if let Some(net) = net {
            cmd.arg("--net").arg(net);
        }
        // Shared storage: the same image the source runs on.
        if let Some(disk) = &def.disk {
            cmd.arg("--disk").arg(disk.flag());
        }
        Self::spawn_detached(cmd, ferry_bin, log)
    }

    /// Runs `cmd` in its own session, stdin null, stdout and stderr
    /// appended to `log`.
    fn spawn_detached(
        mut cmd: Command,
        ferry_bin: &Path,
        log: &Path,
    ) -> Result<Self, SuperviseError> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SuperviseError::Log {
                path: log.to_owned(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| SuperviseError::Log {
            path: log.to_owned(),
            source,
        })?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid(2), which is async-signal-safe and touches no memory
        // of the parent.
        unsafe {
            cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
        }
        let child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            bin: ferry_bin.to_owned(),
            source,
        })?;
        let pid = child.id();
        let start_time = proc_stat(pid).map(|(_, t)| t).unwrap_or_default();
        let pidfd = Arc::new(open_pidfd(pid)?);
        Ok(Self {
            pid,
            start_time,
            pidfd,
            child: Some(child),
        })
    }

    /// Takes over a VMM a previous agent started, if `pid` still is that
    /// process (same start time, not a zombie).
    pub fn adopt(pid: u32, start_time: u64) -> Result<Self, SuperviseError> {
        let pidfd = open_pidfd(pid)?;
        // Checked after the pidfd is open: from here on the pid cannot be
        // reused behind our back while the pidfd lives.
        match proc_stat(pid) {
            None | Some(('Z', _)) | Some(('X', _)) => Err(SuperviseError::Gone { pid }),
            Some((_, t)) if t != start_time => Err(SuperviseError::Reused { pid }),
            Some(_) => Ok(Self {
                pid,
                start_time,
                pidfd: Arc::new(pidfd),
                child: None,
            }),
        }
    }

    /// True once the process has exited (a child of ours is reaped here;
    /// [`Vmm::wait`] then reports its status at once).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => !matches!(proc_stat(self.pid), Some((s, _)) if s != 'Z' && s != 'X'),
        }
    }

    pub fn handle(&self) -> VmmHandle {
        VmmHandle {
            pid: self.pid,
            pidfd: self.pidfd.clone(),
        }
    }

    /// Waits until the process has exited, then reaps it if it is ours.
    pub async fn wait(mut self) -> Exit {
        let registered = self.pidfd.try_clone().ok().and_then(|dup| {
            // SAFETY: `dup` is an open descriptor the AsyncFd owns from
            // here on: it stays open, and is the same descriptor, for the
            // AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }.ok()
        });
        if let Some(fd) = registered {
            // A pidfd turns readable when its process exits.
            let _ = fd.readable().await;
        } else {
            // No reactor for it: poll the process table instead.
            while matches!(proc_stat(self.pid), Some((s, _)) if s != 'Z') {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.reap()
    }

    fn reap(&mut self) -> Exit {
        match self.child.as_mut().map(Child::wait) {
            Some(Ok(status)) => describe(status),
            Some(Err(e)) => Exit {
                clean: false,
                description: format!("exited (cannot reap: {e})"),
            },
            None => Exit {
                clean: false,
                description: "exited while adopted (its exit status went to its former parent)"
                    .into(),
            },
        }
    }
}

fn open_pidfd(pid: u32) -> Result<OwnedFd, SuperviseError> {
    let p = Pid::from_raw(pid as i32).ok_or(SuperviseError::Gone { pid })?;
    pidfd_open(p, PidfdFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::SRCH {
            SuperviseError::Gone { pid }
        } else {
            SuperviseError::Pidfd {
                pid,
                source: e.into(),
            }
        }
    })
}

fn describe(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Exit {
            clean: true,
            description: "exited cleanly (status 0)".into(),
        },
        (Some(code), _) => Exit {
            clean: false,
            description: format!("exited with status {code}"),
        },
        (None, Some(sig)) => Exit {
            clean: false,
            description: format!("killed by signal {sig}"),
        },
        _ => Exit {
            clean: false,
            description: format!("ended: {status}"),
        },
    }
}

/// The last `ferry:` message in a VMM's log (its own account of why it
/// stopped), for a failure's reason.
pub fn last_words(log: &Path) -> String {
    let Ok(text) = std::fs::read(log) else {
        return "(no log)".into();
    };
    let tail = &text[text.len().saturating_sub(64 << 10)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| l.starts_with("ferry:"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "(nothing in its log)".into())
}

/// How long a quick request (status, pause, resume) may take.
pub const QUICK_ANSWER: Duration = Duration::from_secs(10);

/// One request to a VMM's API socket, off the async threads.
pub async fn call(socket: &Path, request: Request) -> Result<Response, SuperviseError> {
    call_within(socket, request, QUICK_ANSWER).await
}

/// Like [`call`], giving up after `limit`.
pub async fn call_within(
    socket: &Path,
    request: Request,
    limit: Duration,
) -> Result<Response, SuperviseError> {
    let socket = socket.to_owned();
    let job = tokio::task::spawn_blocking(move || ferry_control::client::call(&socket, &request));
    match tokio::time::timeout(limit, job).await {
        Err(_) => Err(SuperviseError::Api(format!("no answer within {limit:?}"))),
        Ok(Err(e)) => Err(SuperviseError::Api(e.to_string())),
        Ok(Ok(r)) => r.map_err(|e| SuperviseError::Api(e.to_string())),
    }
}

/// Waits until the VMM answers Status on `socket`, or exits (`exited`
/// turns Some), or `timeout` passes.
pub async fn wait_until_up(
    exited: &mut tokio::sync::watch::Receiver<Option<Exit>>,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<Response, SuperviseError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = exited.borrow().clone() {
            return Err(SuperviseError::DiedStarting {
                status: exit.description,
                last_words: last_words(log),
            });
        }
        if socket.exists() {
            if let Ok(r @ Response::Status { .. }) = call(socket, Request::Status).await {
                return Ok(r);
            }
        }
        if Instant::now() >= deadline {
            return Err(SuperviseError::StartTimeout(timeout));
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), exited.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stat_parses() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
        assert!(proc_stat(u32::MAX >> 1).is_none());
    }
}

/// How a receiving VMM takes its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverSecurity {
    /// Mutual TLS 1.3 with this host's identity in `dir`, taking only the
    /// host `source` (the one whose certificate prepared the migration).
    MutualTls { dir: PathBuf, source: String },
    /// In the clear: both agents allow it.
    Plaintext,
}
