//! The destination's listener. Each connection's handshake (TLS, then the
//! session token's Bind) runs in a thread of its own, so a client that
//! connects and then says nothing holds only its own thread, for at most
//! [`super::HANDSHAKE_TIMEOUT`], and never the source the destination waits for.
//! A plaintext listener without a token has no handshake and takes
//! connections inline.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{AcceptError, Acceptor, Link};

/// Handshakes that may be in flight at once. A connection beyond this
/// cuts the oldest handshake short rather than waiting behind it, so a
/// flood of silent clients delays the real source by at most one
/// connection's worth of their time, never [`super::HANDSHAKE_TIMEOUT`].
pub const MAX_HANDSHAKES: usize = 16;

/// A connection a [`Listener`] refused, and why.
#[derive(Debug, thiserror::Error)]
#[error("refused the connection from {addr}: {error}")]
pub struct Refusal {
    pub addr: SocketAddr,
    #[source]
    pub error: AcceptError,
}

type Accepted = Result<(Link, SocketAddr), Refusal>;

/// The destination's listener: a TCP listener and how it takes
/// connections.
pub struct Listener {
    /// Always non-blocking underneath; `Shared::blocking` holds the mode
    /// the caller asked for.
    tcp: TcpListener,
    acceptor: Acceptor,
    shared: Arc<Shared>,
}

/// What a listener and its clones share with their handshake threads.
struct Shared {
    blocking: AtomicBool,
    handshakes: Mutex<Handshakes>,
    refusals: Mutex<Vec<String>>,
    /// A handshake thread writes a byte here when it ends, to wake a
    /// blocking accept polling `wake_rx` beside the listener.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

#[derive(Default)]
struct Handshakes {
    /// Each handshake in flight: its number and a handle on its socket,
    /// to cut it short. Oldest first.
    in_flight: VecDeque<(u64, TcpStream)>,
    started: u64,
    ended: VecDeque<Accepted>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.tcp.local_addr().ok())
            .field("acceptor", &self.acceptor)
            .finish()
    }
}

impl Listener {
    /// A listener taking connections on `tcp` through `acceptor`.
    ///
    /// # Panics
    /// If the process cannot make a socket pair or set a socket
    /// non-blocking (out of descriptors): a listener without them could
    /// not keep its promise not to be held up.
    pub fn new(tcp: TcpListener, acceptor: Acceptor) -> Self {
        Listener::try_new(tcp, acceptor).expect("setting up a migration listener")
    }

    /// [`Listener::new`], with the error instead of a panic.
    pub fn try_new(tcp: TcpListener, acceptor: Acceptor) -> io::Result<Self> {
        tcp.set_nonblocking(true)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Listener {
            tcp,
            acceptor,
            shared: Arc::new(Shared {
                blocking: AtomicBool::new(true),
                handshakes: Mutex::default(),
                refusals: Mutex::default(),
                wake_tx,
                wake_rx,
            }),
        })
    }

    /// A plaintext listener (tests, and `--insecure-plaintext`).
    pub fn plain(tcp: TcpListener) -> Self {
        Listener::new(tcp, Acceptor::plaintext())
    }

    pub fn acceptor(&self) -> &Acceptor {
        &self.acceptor
    }

    /// Takes the next connection that passes the acceptor. Connections
    /// that fail it are logged, remembered ([`Listener::take_refusals`])
    /// and dropped, and the next is taken. In non-blocking mode,
    /// WouldBlock once none has passed.
    pub fn accept(&self) -> io::Result<(Link, SocketAddr)> {
        loop {
            if let Ok(taken) = self.accept_or_refuse()? {
                return Ok(taken);
            }
        }
    }

    /// Takes one connection: Ok(Ok) when it passed the acceptor, Ok(Err)
    /// with who and why when it was refused (logged, remembered, dropped).
    /// Handshakes end in any order: the first to pass is the first taken.
    pub fn accept_or_refuse(&self) -> io::Result<Accepted> {
        loop {
            if let Some(ended) = self.shared.handshakes().ended.pop_front() {
                return Ok(ended);
            }
            match self.tcp.accept() {
                Ok((tcp, addr)) if self.acceptor.has_handshake() => self.start_handshake(tcp, addr),
                Ok((tcp, addr)) => return Ok(Ok((Link::plain(tcp), addr))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.shared.blocking.load(Ordering::Relaxed) {
                        return Err(e);
                    }
                    wait_readable(self.tcp.as_raw_fd(), self.shared.wake_rx.as_raw_fd())?;
                    self.shared.drain_wakes();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn start_handshake(&self, tcp: TcpStream, addr: SocketAddr) {
        let handle = match tcp.try_clone() {
            Ok(h) => h,
            Err(e) => return self.shared.end(addr, Err(AcceptError::NoThread(e))),
        };
        let number = {
            let mut handshakes = self.shared.handshakes();
            if handshakes.in_flight.len() >= MAX_HANDSHAKES {
                if let Some((_, oldest)) = handshakes.in_flight.pop_front() {
                    tracing::warn!(
                        "{MAX_HANDSHAKES} migration handshakes in flight: cutting short the oldest, from {}",
                        oldest.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string())
                    );
                    let _ = oldest.shutdown(Shutdown::Both);
                }
            }
            handshakes.started += 1;
            let number = handshakes.started;
            handshakes.in_flight.push_back((number, handle));
            number
        };
        let acceptor = self.acceptor.clone();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-handshake".into())
            .spawn(move || {
                let outcome = acceptor.accept(tcp);
                shared.end_handshake(number, addr, outcome);
            });
        if let Err(e) = spawned {
            self.shared
                .end_handshake(number, addr, Err(AcceptError::NoThread(e)));
        }
    }

    /// Takes every refusal noted since the last call.
    pub fn take_refusals(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.shared.refusals))
    }

    /// Non-blocking: `accept` returns WouldBlock when no connection has
    /// passed yet. Shared with the listener's clones.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.shared.blocking.store(!on, Ordering::Relaxed);
        Ok(())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// A second handle on the same listener, sharing its mode, its
    /// handshakes in flight and its refusals.
    pub fn try_clone(&self) -> io::Result<Listener> {
        Ok(Listener {
            tcp: self.tcp.try_clone()?,
            acceptor: self.acceptor.clone(),
            shared: self.shared.clone(),
        })
    }
}

impl Shared {
    fn handshakes(&self) -> MutexGuard<'_, Handshakes> {
        lock(&self.handshakes)
    }

    fn end_handshake(&self, number: u64, addr: SocketAddr, outcome: Result<Link, AcceptError>) {
        self.handshakes().in_flight.retain(|(n, _)| *n != number);
        self.end(addr, outcome);
    }

    /// Queues a handshake's outcome for `accept`, noting a refusal.
    fn end(&self, addr: SocketAddr, outcome: Result<Link, AcceptError>) {
        let ended = outcome.map(|link| (link, addr)).map_err(|error| {
            if matches!(error, AcceptError::Handshake(_)) {
                // ferry-identity has logged it already.
                tracing::debug!("refused a migration connection from {addr}: {error}");
            } else {
                tracing::warn!("refused a migration connection from {addr}: {error}");
            }
            lock(&self.refusals).push(format!("{addr}: {error}"));
            Refusal { addr, error }
        });
        self.handshakes().ended.push_back(ended);
        // A full pipe already holds a wake-up: nothing is lost.
        let _ = (&self.wake_tx).write(&[1]);
    }

    fn drain_wakes(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until either descriptor is readable: a connection to take, or a
/// handshake that ended.
fn wait_readable(listener: RawFd, wake: RawFd) -> io::Result<()> {
    let mut fds = [listener, wake].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is an array of two valid pollfds that outlives the
    // call, and both descriptors are owned by the listener, which the
    // caller borrows for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
