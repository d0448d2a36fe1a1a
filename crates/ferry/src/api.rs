//! The VM's API socket (`ferry run --api PATH`): a Unix socket speaking one
//! JSON request and one JSON response per line. Connections are served on
//! their own threads; the requests reach the thread that owns the VM, which
//! answers them between console events.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_control::client::ANSWER_TIMEOUT;
use ferry_control::{Request, Response, TuneRequest};
use ferry_migration::cancel::{CancelState, Verdict};
use ferry_migration::tuning::Tuning;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

/// The cancel of the migration under way. The VM's owner is busy inside
/// the migration, so a `CancelMigration` is answered by the connection's
/// own thread, against the engine's cancel state: accepted if it comes
/// before the engine seals it at its blackout, refused after.
#[derive(Debug, Default)]
pub struct MigrationCancel {
    /// The migration under way's cancel state; None between migrations.
    current: Mutex<Option<Arc<CancelState>>>,
    active: AtomicBool,
    /// The live settings of the migration under way, retuned the same way.
    tuning: Mutex<Option<Arc<Tuning>>>,
}

/// What a cancel got from the migration under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelAnswer {
    NotMigrating,
    Verdict(Verdict),
}

impl MigrationCancel {
    /// A migration starts: a fresh, open cancel state for its engine.
    pub fn begin(&self) -> Arc<CancelState> {
        let state = Arc::new(CancelState::new());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        self.active.store(true, Ordering::SeqCst);
        state
    }

    /// The live settings of the migration that starts, from its request.
    pub fn begin_tuning(&self, bandwidth: Option<u64>) -> Arc<Tuning> {
        let tuning = Arc::new(Tuning::new(bandwidth));
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = Some(tuning.clone());
        tuning
    }

    /// The migration has ended, one way or the other.
    pub fn end(&self) {
        self.active.store(false, Ordering::SeqCst);
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Kept: a cancel that comes after a commit but before the process
        // exits is refused by the seal rather than told "nothing runs".
    }

    /// Passes `tune` to the migration under way; says whether one ran.
    fn tune(&self, tune: &TuneRequest) -> bool {
        let slot = self.tuning.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tuning) = slot.as_ref().filter(|_| self.active.load(Ordering::SeqCst)) else {
            return false;
        };
        if let Some(b) = tune.bandwidth {
            tuning.set_bandwidth(b);
        }
        if let Some(ms) = tune.downtime_ms {
            tuning.set_downtime(Duration::from_secs_f64(ms / 1e3));
        }
        if tune.postcopy {
            tuning.request_postcopy();
        }
        true
    }

    /// Races the engine's seal for the migration under way.
    fn request(&self) -> CancelAnswer {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match current.as_ref() {
            Some(state) if self.active.load(Ordering::SeqCst) => {
                CancelAnswer::Verdict(state.cancel())
            }
            // Ended: a sealed one was committing or has committed; an
            // open or cancelled one has failed or was cancelled.
            Some(state) => match state.sealed() {
                Some(sealed) => CancelAnswer::Verdict(Verdict::Refused(sealed)),
                None => CancelAnswer::NotMigrating,
            },
            None => CancelAnswer::NotMigrating,
        }
    }
}

/// The answer to a `CancelMigration`.
fn cancel_response(answer: CancelAnswer) -> Response {
    match answer {
        CancelAnswer::NotMigrating => Response::CancelRequested { migrating: false },
        CancelAnswer::Verdict(Verdict::Accepted) => Response::CancelRequested { migrating: true },
        CancelAnswer::Verdict(Verdict::Refused(sealed)) => Response::CancelRefused {
            sealed,
            reason: sealed.reason().into(),
        },
    }
}

/// A request waiting for the VM's owner, and where the answer goes.
pub struct Pending {
    pub request: Request,
    reply: Sender<Response>,
    /// Told once the final answer is on the socket.
    written: Receiver<()>,
    cancel: Arc<MigrationCancel>,
}

/// How long `answer` waits for the final answer to be written: the VM's
/// owner may exit right after it (a VM that migrated away), and an answer
/// still in the connection's thread would be lost with the process (the
/// source agent then saw "closed the connection without answering" for a
/// migration that had committed).
const WRITE_WAIT: Duration = Duration::from_secs(2);

impl Pending {
    /// The cancel a migration started for this request listens to.
    pub fn cancel(&self) -> &MigrationCancel {
        &self.cancel
    }

    pub fn answer(self, response: Response) {
        // The client may have gone; the work is done either way.
        if self.reply.send(response).is_ok() {
            let _ = self.written.recv_timeout(WRITE_WAIT);
        }
    }

    /// A line before the answer (migration progress); the client may have
    /// gone, which must not stop the work.
    pub fn progress(&self, response: Response) {
        let _ = self.reply.send(response);
    }
}

pub struct ApiServer {
    path: PathBuf,
    requests: Receiver<Pending>,
}

impl ApiServer {
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!(
                    "--api {}: a file that is not a socket is in the way",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!("--api {}: another VM already listens there", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("--api {}: cannot listen", path.display()))?;
        let (tx, rx) = channel();
        let cancel = Arc::new(MigrationCancel::default());
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    let tx = tx.clone();
                    let cancel = cancel.clone();
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || serve(stream, tx, cancel));
                }
            })
            .context("spawning the API thread")?;
        Ok(Self {
            path: path.to_owned(),
            requests: rx,
        })
    }

    pub fn try_next(&self) -> Option<Pending> {
        self.requests.try_recv().ok()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, owner: Sender<Pending>, cancel: Arc<MigrationCancel>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    })
    .take(MAX_REQUEST);
    let mut writer = stream;
    let mut line = String::new();
    let response = match reader.read_line(&mut line) {
        Ok(0) => return,
        Err(e) => Response::Error {
            message: format!("cannot read the request: {e}"),
        },
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
            Ok(Request::CancelMigration) => cancel_response(cancel.request()),
            Ok(Request::TuneMigration(tune)) => match tune_error(&tune) {
                Some(message) => Response::Error { message },
                None => Response::TuneRequested {
                    migrating: cancel.tune(&tune),
                },
            },
            Ok(request) => {
                let (reply, answer) = channel();
                let (done, written) = channel();
                if owner
                    .send(Pending {
                        request,
                        reply,
                        written,
                        cancel,
                    })
                    .is_err()
                {
                    Response::Error {
                        message: "the VM is gone".into(),
                    }
                } else {
                    loop {
                        let response =
                            answer
                                .recv_timeout(ANSWER_TIMEOUT)
                                .unwrap_or(Response::Error {
                                    message: "the VM did not answer in time".into(),
                                });
                        if response.is_final() {
                            let _ = write_line(&mut writer, &response);
                            let _ = done.send(());
                            return;
                        }
                        // A client that went away does not stop the work.
                        let _ = write_line(&mut writer, &response);
                    }
                }
            }
        },
    };
    let _ = write_line(&mut writer, &response);
}

/// Why `tune` cannot be applied, if it cannot.
fn tune_error(tune: &TuneRequest) -> Option<String> {
    match tune.downtime_ms {
        Some(ms) if !ms.is_finite() || !(0.0..=3.6e6).contains(&ms) => Some(format!(
            "downtime_ms {ms} is not a duration (0 to 3600000 ms)"
        )),
        _ => None,
    }
}

fn write_line(w: &mut impl Write, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).unwrap_or_default();
    text.push('\n');
    w.write_all(text.as_bytes())
}

pub use ferry_control::client::{call, call_with_progress};
