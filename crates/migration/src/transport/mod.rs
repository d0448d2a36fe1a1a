//! The engine's connections: plain TCP, or mutually authenticated TLS 1.3
//! (ferry-identity), behind one type the engine reads, writes and splits.
//!
//! - [`Link`]: one connection. `try_clone` gives a second handle for a
//!   second thread (post-copy reads and writes its fault channel from two
//!   threads); over TLS the clones share one rustls state, and no lock is
//!   held across socket I/O (see `tls_link`).
//! - [`Dialer`]: the source's side, plain or TLS with our identity and the
//!   name of the destination we mean to reach (its certificate must say so).
//!   A link remembers its dialer, so the page-data streams, the fault
//!   channel and every reconnect are dialed the same way as the main
//!   connection.
//! - [`Listener`]: the destination's listener with its [`Acceptor`]: plain,
//!   or TLS requiring a client certificate of the fleet CA whose host is
//!   allowed (deny by default). A connection that fails the handshake is
//!   logged and dropped, and the listener goes on accepting. Handshakes
//!   run side by side (see `listener`), so a silent client holds nobody up.
//!
//! A dialer and an acceptor may carry a one-time [`SessionToken`] (protocol
//! v8): then every connection opens with Bind / BindAck (see `session`), so
//! the main connection, the extra streams, the fault channel and every
//! reconnect are bound to the migration the destination was prepared for,
//! and a connection with a wrong or replayed token is refused like one that
//! failed its handshake.
//!
//! The wire protocol is the same inside the tunnel as on plain TCP.

mod listener;
mod records;
mod session;
mod tls_link;

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use ferry_identity::{Allowed, HandshakeError, Identity, PeerIdentity, ALPN_MIGRATION};

pub use listener::{Listener, Refusal, MAX_HANDSHAKES};
pub use session::{bind_as_destination, bind_as_source, BindError, SessionToken, TokenError};
pub use tls_link::Ready;
use tls_link::TlsLink;

/// How long a TLS handshake on a migration connection may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A transport that cannot be set up from what it was given.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("loading the identity: {0}")]
    Identity(#[from] ferry_identity::IdentityError),
    #[error("{0}")]
    Config(#[from] ferry_identity::ConfigError),
    #[error("`{0}` cannot be a peer host name: give the host name its certificate was issued for")]
    BadPeerName(String),
    #[error("a TLS destination must allow at least one source host (`--allow-source HOST`)")]
    NobodyAllowed,
}

/// Why a connection to the destination could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Bind(#[from] BindError),
}

impl DialError {
    /// Whether another attempt may succeed (the link, not the peer).
    pub fn is_retryable(&self) -> bool {
        match self {
            DialError::Connect { .. } => true,
            DialError::Handshake(h) => h.is_retryable(),
            DialError::Bind(b) => b.is_retryable(),
        }
    }
}

/// Why the destination refused a connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("cannot start its handshake: {0}")]
    NoThread(io::Error),
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        let kind = match &e {
            DialError::Connect { source, .. } => source.kind(),
            DialError::Handshake(h) if h.is_retryable() => io::ErrorKind::ConnectionAborted,
            DialError::Handshake(_) => io::ErrorKind::PermissionDenied,
            DialError::Bind(b) if b.is_retryable() => io::ErrorKind::ConnectionAborted,
            DialError::Bind(_) => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// One migration connection, plain or TLS.
pub struct Link {
    kind: Kind,
    /// How this link was dialed, to dial its siblings the same way; None
    /// for a link a listener accepted.
    dialer: Option<Dialer>,
    /// The link opened with an accepted session token.
    bound: bool,
}

enum Kind {
    Plain(TcpStream),
    Tls(Arc<TlsLink>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.describe())
            .field("peer_addr", &self.tcp().peer_addr().ok())
            .finish()
    }
}

impl Link {
    /// A plaintext link over `tcp`.
    pub fn plain(tcp: TcpStream) -> Self {
        Link {
            kind: Kind::Plain(tcp),
            dialer: None,
            bound: false,
        }
    }

    fn tls(stream: ferry_identity::TlsStream) -> Self {
        let (conn, tcp, peer) = stream.into_parts();
        Link {
            kind: Kind::Tls(Arc::new(TlsLink::new(conn, tcp, peer))),
            dialer: None,
            bound: false,
        }
    }

    /// The TCP socket underneath (addresses, TCP_INFO). Never read or
    /// write it directly on a TLS link.
    pub fn tcp(&self) -> &TcpStream {
        match &self.kind {
            Kind::Plain(t) => t,
            Kind::Tls(t) => t.tcp(),
        }
    }

    /// Whether the link is encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, Kind::Tls(_))
    }

    /// The verified peer on a TLS link.
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        match &self.kind {
            Kind::Plain(_) => None,
            Kind::Tls(t) => Some(t.peer()),
        }
    }

    /// What a report says about this link: `tls1.3 TLS13_AES_128_GCM_SHA256,
    /// peer host hostB`, or `plaintext (insecure, asked on both sides)`;
    /// `, bound by a session token` follows on a bound link.
    pub fn describe(&self) -> String {
        let bound = if self.bound {
            ", bound by a one-time session token"
        } else {
            ""
        };
        match &self.kind {
            Kind::Plain(_) => format!("plaintext (insecure, asked on both sides){bound}"),
            Kind::Tls(t) => format!("tls1.3 {}, peer {}{bound}", t.suite(), t.peer()),
        }
    }

    /// Whether the link opened with an accepted session token.
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// A second handle on the same connection, for another thread.
    pub fn try_clone(&self) -> io::Result<Link> {
        let kind = match &self.kind {
            Kind::Plain(t) => Kind::Plain(t.try_clone()?),
            Kind::Tls(t) => Kind::Tls(t.clone()),
        };
        Ok(Link {
            kind,
            dialer: self.dialer.clone(),
            bound: self.bound,
        })
    }

    /// The dialer that made this link (plaintext for an accepted one).
    pub fn dialer(&self) -> Dialer {
        self.dialer.clone().unwrap_or_else(Dialer::plaintext)
    }

    /// Opens another connection to `addr` the way this one was opened.
    pub fn dial_sibling(&self, addr: SocketAddr, timeout: Duration) -> Result<Link, DialError> {
        self.dialer().dial(addr, timeout)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(t)
    }

    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        self.tcp().read_timeout()
    }

    /// Non-blocking reads and writes return WouldBlock; on TLS a record
    /// cut short stays buffered for the next read.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nonblocking(on)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// Shuts the socket down; on TLS a shutdown of the writing side first
    /// sends close_notify (unless another thread is writing).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Kind::Tls(t), Shutdown::Write) = (&self.kind, how) {
            t.close_notify();
        }
        self.tcp().shutdown(how)
    }

    /// Whether a read would find something now, without blocking.
    pub fn ready_now(&self) -> io::Result<Ready> {
        match &self.kind {
            Kind::Plain(t) => {
                t.set_nonblocking(true)?;
                let mut byte = [0u8; 1];
                let peeked = t.peek(&mut byte);
                t.set_nonblocking(false)?;
                match peeked {
                    Ok(0) => Ok(Ready::Closed),
                    Ok(_) => Ok(Ready::Data),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Ready::Nothing),
                    Err(e) => Err(e),
                }
            }
            Kind::Tls(t) => t.ready_now(),
        }
    }

    /// True when the link has bytes to read (or is closed: the read that
    /// follows reports that), false if `timeout` passed first.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        match &self.kind {
            Kind::Plain(t) => poll_readable(t, timeout),
            Kind::Tls(t) => t.wait_readable(timeout),
        }
    }
}

/// poll(2) for readability on one socket.
fn poll_readable(tcp: &TcpStream, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: tcp.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd that outlives the call, and the
    // descriptor belongs to `tcp`, borrowed for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

impl Read for &Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.kind {
            Kind::Plain(t) => (&*t).read(buf),
            Kind::Tls(t) => t.read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match &self.kind {
            Kind::Plain(t) => (&*t).read_vectored(bufs),
            Kind::Tls(t) => match bufs.iter_mut().find(|b| !b.is_empty()) {
                Some(b) => t.read(b),
                None => Ok(0),
            },
        }
    }
}

impl Write for &Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.kind {
            Kind::Plain(t) => (&*t).write_vectored(bufs),
            Kind::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How the source opens connections to the destination.
#[derive(Clone)]
pub struct Dialer(Arc<DialSecurity>, Option<Arc<SessionToken>>);

enum DialSecurity {
    Plain,
    Tls {
        client: Arc<rustls::ClientConfig>,
        peer_name: String,
    },
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = if self.1.is_some() { ", bound" } else { "" };
        match &*self.0 {
            DialSecurity::Plain => write!(f, "Dialer(plaintext{bound})"),
            DialSecurity::Tls { peer_name, .. } => write!(f, "Dialer(tls to {peer_name}{bound})"),
        }
    }
}

impl Dialer {
    /// Plain TCP: only when the user asked for it on both sides.
    pub fn plaintext() -> Self {
        Dialer(Arc::new(DialSecurity::Plain), None)
    }

    /// Every connection this dialer opens presents `token` first (protocol
    /// v8) and is refused unless the destination accepts it.
    pub fn with_token(self, token: SessionToken) -> Self {
        Dialer(self.0, Some(Arc::new(token)))
    }

    /// TLS 1.3 as `identity`, to a destination whose certificate is for
    /// host `peer_name`.
    pub fn tls(identity: &Identity, peer_name: &str) -> Result<Self, TransportError> {
        ferry_identity::validate_name(peer_name)
            .map_err(|_| TransportError::BadPeerName(peer_name.into()))?;
        let client = ferry_identity::client_config(identity, &[ALPN_MIGRATION])?;
        Ok(Dialer(
            Arc::new(DialSecurity::Tls {
                client,
                peer_name: peer_name.into(),
            }),
            None,
        ))
    }

    /// Loads the identity in `dir` (`ca.crt`, `cert.pem`, `key.pem`) and
    /// makes a [`Dialer::tls`].
    pub fn tls_from_dir(dir: &std::path::Path, peer_name: &str) -> Result<Self, TransportError> {
        Dialer::tls(&Identity::load(dir)?, peer_name)
    }

    pub fn is_tls(&self) -> bool {
        matches!(*self.0, DialSecurity::Tls { .. })
    }

    /// Connects to `addr` within `timeout` (TCP), then shakes hands
    /// (within [`HANDSHAKE_TIMEOUT`]) on a TLS dialer, then binds the link
    /// with the session token if the dialer has one. The link comes with
    /// TCP_NODELAY set.
    pub fn dial(&self, addr: SocketAddr, timeout: Duration) -> Result<Link, DialError> {
        let connect = |source| DialError::Connect { addr, source };
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
        tcp.set_nodelay(true).map_err(connect)?;
        let mut link = match &*self.0 {
            DialSecurity::Plain => Link::plain(tcp),
            DialSecurity::Tls { client, peer_name } => Link::tls(
                ferry_identity::tls::connect_timeout(tcp, client, peer_name, HANDSHAKE_TIMEOUT)?,
            ),
        };
        if let Some(token) = &self.1 {
            bind_as_source(
                &link,
                token,
                |t| link.set_read_timeout(t),
                HANDSHAKE_TIMEOUT,
            )?;
            link.bound = true;
        }
        link.dialer = Some(self.clone());
        Ok(link)
    }
}

/// How the destination takes connections.
#[derive(Clone)]
pub struct Acceptor(Arc<AcceptSecurity>, Option<Arc<SessionToken>>);

enum AcceptSecurity {
    Plain,
    Tls {
        server: Arc<rustls::ServerConfig>,
        allowed: Allowed,
    },
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = if self.1.is_some() { ", bound" } else { "" };
        match &*self.0 {
            AcceptSecurity::Plain => write!(f, "Acceptor(plaintext{bound})"),
            AcceptSecurity::Tls { allowed, .. } => {
                write!(f, "Acceptor(tls, {allowed:?}{bound})")
            }
        }
    }
}

impl Acceptor {
    /// Plain TCP: only when the user asked for it on both sides.
    pub fn plaintext() -> Self {
        Acceptor(Arc::new(AcceptSecurity::Plain), None)
    }

    /// Takes only connections that open with `token` (protocol v8); any
    /// other is told why and refused.
    pub fn with_token(self, token: SessionToken) -> Self {
        Acceptor(self.0, Some(Arc::new(token)))
    }

    /// TLS 1.3 as `identity`, taking only clients of the fleet CA whose
    /// host is one of `sources` (deny by default: none given, none taken).
    pub fn tls<I, S>(identity: &Identity, sources: I) -> Result<Self, TransportError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let sources: Vec<String> = sources.into_iter().map(Into::into).collect();
        if sources.is_empty() {
            return Err(TransportError::NobodyAllowed);
        }
        for name in &sources {
            ferry_identity::validate_name(name)
                .map_err(|_| TransportError::BadPeerName(name.clone()))?;
        }
        let server = ferry_identity::server_config(identity, &[ALPN_MIGRATION])?;
        Ok(Acceptor(
            Arc::new(AcceptSecurity::Tls {
                server,
                allowed: Allowed::hosts(sources),
            }),
            None,
        ))
    }

    /// Loads the identity in `dir` and makes an [`Acceptor::tls`].
    pub fn tls_from_dir<I, S>(dir: &std::path::Path, sources: I) -> Result<Self, TransportError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Acceptor::tls(&Identity::load(dir)?, sources)
    }

    pub fn is_tls(&self) -> bool {
        matches!(*self.0, AcceptSecurity::Tls { .. })
    }

    /// Whether a connection must pass a handshake (TLS, or a token's
    /// Bind) before it is a link.
    pub(crate) fn has_handshake(&self) -> bool {
        self.is_tls() || self.1.is_some()
    }

    /// Makes a link of a connection a listener took; a TLS client that
    /// fails the handshake or is not allowed, or a source whose session
    /// token is wrong, is refused (told why where it can be) and the error
    /// says why.
    pub fn accept(&self, tcp: TcpStream) -> Result<Link, AcceptError> {
        let mut link = self.secure(tcp)?;
        if let Some(token) = &self.1 {
            link.set_nonblocking(false).map_err(BindError::Io)?;
            link.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
                .map_err(BindError::Io)?;
            bind_as_destination(&link, token)?;
            link.set_read_timeout(None).map_err(BindError::Io)?;
            link.bound = true;
        }
        Ok(link)
    }

    fn secure(&self, tcp: TcpStream) -> Result<Link, HandshakeError> {
        match &*self.0 {
            AcceptSecurity::Plain => Ok(Link::plain(tcp)),
            AcceptSecurity::Tls { server, allowed } => {
                let peer = tcp
                    .peer_addr()
                    .map_or_else(|_| "an unknown address".into(), |a| a.to_string());
                if let Err(source) = tcp.set_nonblocking(false) {
                    return Err(HandshakeError::Io { peer, source });
                }
                let (stream, _who) = ferry_identity::tls::accept_authorized(
                    tcp,
                    server,
                    allowed,
                    HANDSHAKE_TIMEOUT,
                )?;
                Ok(Link::tls(stream))
            }
        }
    }
}

#[cfg(test)]
mod tests;
