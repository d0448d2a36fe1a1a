//! Mutually authenticated TLS 1.3 for Ferry: rustls configurations that
//! trust only the fleet CA and require a certificate from both sides, and a
//! blocking [`TlsStream`] over a `TcpStream` for the migration data plane.
//!
//! The blocking handshake, as [`connect`] and [`accept`] run it:
//!
//! ```text
//!   source (connect)                          destination (accept)
//!   ClientHello (SNI = expected host)  --->
//!                                      <---   ServerHello .. Certificate, Finished
//!   checks: chain to the fleet CA, DNS name
//!   = expected host, URI ferry://host/<expected>
//!   Certificate, CertificateVerify, Finished --->
//!                                             checks: chain to the fleet CA, a
//!                                             ferry:// URI; on failure a TLS alert
//!                                             (accept_authorized: is it allowed?)
//!                                      <---   0x06 "accepted", or
//!                                             0x15 "refused", a reason line, close
//! ```
//!
//! In TLS 1.3 the client finishes its handshake before the server has
//! judged the client's certificate, so a refusal would only surface at the
//! client's first read. The accept byte makes [`connect`] return only once
//! the server has accepted, and a refusal an error that says why. Both ends
//! must therefore be this module's [`connect`] and [`accept`]; the
//! configurations alone ([`server_config`], [`client_config`]) carry no such
//! byte and serve any rustls user (e.g. the agent's HTTP API).
//!
//! Session resumption is off on both sides: every connection presents and
//! checks full certificates. Configurations for [`ALPN_MIGRATION`] alone
//! allow the traffic keys to be extracted once the handshake is done: the
//! migration data plane seals and opens its records itself.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon,
    ServerConfig, ServerConnection, SideData, StreamOwned,
};

use crate::authz::{authorize, Allowed, AuthzError};
use crate::identity::{client_verifier, provider, show_time, Identity, VerifierError};
use crate::peer::{PeerError, PeerIdentity, Role};
use crate::verify::{FerryClientVerifier, FerryServerVerifier};

/// ALPN protocol of Ferry's migration streams.
pub const ALPN_MIGRATION: &str = "ferry-migration/1";

/// How long [`connect`] and [`accept`] wait for a handshake to finish.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`accept`] sends once it has accepted the client (ASCII ACK).
const ACCEPTED: u8 = 0x06;
/// What [`accept_authorized`] sends, then a reason line, to a client it
/// does not allow (ASCII NAK).
const REFUSED: u8 = 0x15;
/// Longest refusal reason read by a client.
const MAX_REASON: usize = 512;

/// A TLS configuration that cannot be built from an identity.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{me} cannot serve TLS: an operator certificate is for clients only; give this host a host identity (`ferry ca issue --name HOST CA_DIR`)")]
    OperatorCannotServe { me: PeerIdentity },
    #[error("TLS configuration for {me}: {source}")]
    Verifier {
        me: PeerIdentity,
        #[source]
        source: VerifierError,
    },
    #[error("TLS configuration for {me}: {source}")]
    Tls {
        me: PeerIdentity,
        #[source]
        source: rustls::Error,
    },
}

/// Whether connections for these protocols may hand their traffic keys
/// over after the handshake: only the migration data plane, whose links
/// run the TLS record layer themselves (ferry-migration's `transport`) to
/// move guest memory with fewer copies. Every other use keeps its keys
/// inside rustls.
fn hands_over_keys(alpn: &[&str]) -> bool {
    alpn == [ALPN_MIGRATION]
}

/// A server configuration: TLS 1.3 only, our certificate, and a client
/// certificate chaining to the fleet CA required. `alpn` lists the
/// protocols offered, most preferred first (e.g. [`ALPN_MIGRATION`], or
/// `"h2"`, `"http/1.1"` for the agent API); empty for none.
pub fn server_config(identity: &Identity, alpn: &[&str]) -> Result<Arc<ServerConfig>, ConfigError> {
    let me = identity.me().clone();
    if identity.role() != Role::Host {
        return Err(ConfigError::OperatorCannotServe { me });
    }
    let provider = provider();
    let verifier = client_verifier(identity.ca_cert(), provider.clone()).map_err(|source| {
        ConfigError::Verifier {
            me: me.clone(),
            source,
        }
    })?;
    let tls = |source| ConfigError::Tls {
        me: me.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(FerryClientVerifier::new(verifier))
        .with_single_cert(vec![identity.cert().clone()], identity.key())
        .map_err(tls)?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.enable_secret_extraction = hands_over_keys(alpn);
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// A client configuration: TLS 1.3 only, trusting only the fleet CA, and
/// presenting our certificate. The server name checked is the one given to
/// [`connect`]: the peer host's name.
pub fn client_config(identity: &Identity, alpn: &[&str]) -> Result<Arc<ClientConfig>, ConfigError> {
    let me = identity.me().clone();
    let tls = |source| ConfigError::Tls {
        me: me.clone(),
        source,
    };
    let roots = identity.roots().map_err(tls)?;
    let provider = provider();
    let verifier = FerryServerVerifier::new(roots, provider.clone()).map_err(|source| {
        ConfigError::Verifier {
            me: me.clone(),
            source,
        }
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert().clone()], identity.key())
        .map_err(tls)?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.enable_secret_extraction = hands_over_keys(alpn);
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed. `peer` says which side and its socket
/// address: "the server at 10.0.0.2:7070", "the client at ...".
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("`{name}` cannot be a TLS server name: give the destination's host name, as in its certificate")]
    BadServerName { name: String },
    #[error("TLS handshake with {peer} did not finish within {timeout:?}: is it a Ferry peer speaking TLS?")]
    Timeout { peer: String, timeout: Duration },
    #[error("{peer} closed the connection during the TLS handshake: it may have refused us (see its log)")]
    Closed { peer: String },
    #[error("the certificate of {peer} is not signed by our fleet CA: it belongs to another fleet, or one side has the wrong ca.crt")]
    UnknownCa { peer: String },
    #[error(
        "the certificate of {peer} has expired ({detail}): reissue it with `ferry ca issue --force`"
    )]
    Expired { peer: String, detail: String },
    #[error("the certificate of {peer} is not valid yet ({detail}): check both hosts' clocks")]
    NotYetValid { peer: String, detail: String },
    #[error("{peer} is not host {expected}: its certificate is for {presented}; check the address of {expected}")]
    WrongHost {
        peer: String,
        expected: String,
        presented: String,
    },
    #[error("the certificate of {peer} may not be used this way ({detail}); an operator certificate cannot serve")]
    WrongPurpose { peer: String, detail: String },
    #[error(
        "{peer} sent no client certificate: every Ferry connection needs one (give it `--tls DIR`)"
    )]
    NoClientCertificate { peer: String },
    #[error("{peer} does not speak TLS ({detail}): plaintext or garbage on a TLS port; is it running with --insecure-plaintext?")]
    NotTls { peer: String, detail: String },
    #[error("{peer} cannot do TLS 1.3 the way Ferry requires ({detail}): it is not a Ferry peer, or an outdated one")]
    Incompatible { peer: String, detail: String },
    #[error("{peer} refused the TLS handshake (alert {alert}): {hint}")]
    RefusedByPeer {
        peer: String,
        alert: String,
        hint: &'static str,
    },
    #[error("{peer} completed the TLS handshake, then closed the connection without accepting us: see its log")]
    NotAccepted { peer: String },
    #[error("{peer} does not allow us: {reason}")]
    NotAuthorized { peer: String, reason: String },
    #[error("{peer}: {source}")]
    Unauthorized {
        peer: String,
        #[source]
        source: AuthzError,
    },
    #[error("{peer} sent {byte:#04x} where a Ferry peer sends its accept byte: not a Ferry peer?")]
    NotFerry { peer: String, byte: u8 },
    #[error("the certificate of {peer} states no usable Ferry identity: {source}")]
    NoFerryIdentity {
        peer: String,
        #[source]
        source: PeerError,
    },
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls {
        peer: String,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS handshake with {peer}: {source}")]
    Io {
        peer: String,
        #[source]
        source: io::Error,
    },
}

impl HandshakeError {
    /// Whether trying again may help (a lost link, a slow peer) rather
    /// than only a change of certificates or configuration.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HandshakeError::Timeout { .. }
                | HandshakeError::Closed { .. }
                | HandshakeError::Io { .. }
        )
    }
}

/// A TLS 1.3 stream over TCP whose peer has been authenticated.
/// `Read`/`Write` carry application data; [`TlsStream::close`] ends it
/// cleanly.
pub struct TlsStream {
    inner: Inner,
    peer: PeerIdentity,
}

enum Inner {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .field("tcp", self.tcp())
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Who is on the other end (verified).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The TCP stream underneath (for `set_nodelay`, timeouts, addresses).
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Client(s) => s.get_ref(),
            Inner::Server(s) => s.get_ref(),
        }
    }

    /// The ALPN protocol both sides agreed on, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Client(s) => s.conn.alpn_protocol(),
            Inner::Server(s) => s.conn.alpn_protocol(),
        }
    }

    /// The TLS version in use (always TLS 1.3 with these configurations).
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.inner {
            Inner::Client(s) => s.conn.protocol_version(),
            Inner::Server(s) => s.conn.protocol_version(),
        }
    }

    /// The cipher suite negotiated, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub fn cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        match &self.inner {
            Inner::Client(s) => s.conn.negotiated_cipher_suite(),
            Inner::Server(s) => s.conn.negotiated_cipher_suite(),
        }
    }

    /// The rustls connection, its TCP stream and the verified peer, for a
    /// caller that drives the records itself (e.g. to read and write from
    /// two threads). Plaintext the connection has already received stays
    /// buffered in it.
    pub fn into_parts(self) -> (rustls::Connection, TcpStream, PeerIdentity) {
        let (conn, tcp) = match self.inner {
            Inner::Client(s) => {
                let (conn, tcp) = s.into_parts();
                (rustls::Connection::from(conn), tcp)
            }
            Inner::Server(s) => {
                let (conn, tcp) = s.into_parts();
                (rustls::Connection::from(conn), tcp)
            }
        };
        (conn, tcp, self.peer)
    }

    /// Sends TLS close_notify and flushes: the peer reads a clean end of
    /// stream instead of a truncation error.
    pub fn close(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Client(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
            Inner::Server(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.read(buf),
            Inner::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.write(buf),
            Inner::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Client(s) => s.flush(),
            Inner::Server(s) => s.flush(),
        }
    }
}

/// Connects as the client over `tcp`, to the host named `expected_host`
/// (checked against the server certificate's DNS name and its
/// `ferry://host/NAME` URI), within [`HANDSHAKE_TIMEOUT`].
pub fn connect(
    tcp: TcpStream,
    config: &Arc<ClientConfig>,
    expected_host: &str,
) -> Result<TlsStream, HandshakeError> {
    connect_timeout(tcp, config, expected_host, HANDSHAKE_TIMEOUT)
}

/// [`connect`] with another handshake timeout.
pub fn connect_timeout(
    mut tcp: TcpStream,
    config: &Arc<ClientConfig>,
    expected_host: &str,
    timeout: Duration,
) -> Result<TlsStream, HandshakeError> {
    let peer = format!("the server at {}", peer_addr(&tcp));
    let server_name = ServerName::try_from(expected_host.to_string()).map_err(|_| {
        HandshakeError::BadServerName {
            name: expected_host.to_string(),
        }
    })?;
    let mut conn = ClientConnection::new(config.clone(), server_name).map_err(|source| {
        HandshakeError::Tls {
            peer: peer.clone(),
            source,
        }
    })?;
    let saved = Timeouts::save(&tcp, &peer)?;
    let ctx = Ctx {
        peer: &peer,
        expected: Some(expected_host),
        timeout,
        deadline: Instant::now() + timeout,
    };
    drive(&mut conn, &mut tcp, &ctx, |conn| Ok(!conn.is_handshaking()))?;

    // webpki checked the DNS name; the URI says which host this really is
    // (a certificate may carry extra DNS names).
    let identity =
        PeerIdentity::from_connection(&conn).map_err(|source| HandshakeError::NoFerryIdentity {
            peer: peer.clone(),
            source,
        })?;
    if !identity.is_host(expected_host) {
        return Err(HandshakeError::WrongHost {
            peer,
            expected: expected_host.to_string(),
            presented: identity.to_string(),
        });
    }

    // The server's verdict: ACCEPTED, or REFUSED and a reason line.
    let mut refusal: Option<Vec<u8>> = None;
    drive(&mut conn, &mut tcp, &ctx, |conn| {
        let refused = |reason: &[u8]| HandshakeError::NotAuthorized {
            peer: peer.clone(),
            reason: String::from_utf8_lossy(reason).trim_end().to_string(),
        };
        loop {
            let Some(reason) = refusal.as_mut() else {
                // Read one byte only: what follows ACCEPTED is the
                // caller's data.
                let mut byte = [0u8; 1];
                match conn.reader().read(&mut byte) {
                    Ok(1) if byte[0] == ACCEPTED => return Ok(true),
                    Ok(1) if byte[0] == REFUSED => {
                        refusal = Some(Vec::new());
                        continue;
                    }
                    Ok(1) => {
                        return Err(HandshakeError::NotFerry {
                            peer: peer.clone(),
                            byte: byte[0],
                        })
                    }
                    Ok(_) => return Err(HandshakeError::NotAccepted { peer: peer.clone() }),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(HandshakeError::NotAccepted { peer: peer.clone() })
                    }
                    Err(source) => {
                        return Err(HandshakeError::Io {
                            peer: peer.clone(),
                            source,
                        })
                    }
                }
            };
            let mut buf = [0u8; 256];
            match conn.reader().read(&mut buf) {
                Ok(0) => return Err(refused(reason)),
                Ok(n) => {
                    reason.extend_from_slice(&buf[..n]);
                    if let Some(end) = reason.iter().position(|&b| b == b'\n') {
                        return Err(refused(&reason[..end]));
                    }
                    if reason.len() >= MAX_REASON {
                        return Err(refused(&reason[..MAX_REASON]));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(_) => return Err(refused(reason)),
            }
        }
    })?;
    saved.restore(&tcp, &peer)?;
    Ok(TlsStream {
        inner: Inner::Client(StreamOwned::new(conn, tcp)),
        peer: identity,
    })
}

/// Accepts one TLS client on `tcp` within [`HANDSHAKE_TIMEOUT`]: it must
/// present a certificate of the fleet CA stating a Ferry identity. Returns
/// the stream and who the client is. Prefer [`accept_authorized`], which
/// also tells a client that is not allowed why. A failure is logged and the
/// connection dropped; the listener should go on accepting.
pub fn accept(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
) -> Result<(TlsStream, PeerIdentity), HandshakeError> {
    accept_timeout(tcp, config, HANDSHAKE_TIMEOUT)
}

/// [`accept`] with another handshake timeout.
pub fn accept_timeout(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(TlsStream, PeerIdentity), HandshakeError> {
    let peer = format!("the client at {}", peer_addr(&tcp));
    accept_inner(tcp, config, None, timeout, &peer).inspect_err(|e| {
        tracing::warn!("refused a TLS connection: {e}");
    })
}

/// [`accept`], then [`crate::authorize`] the client against `allowed`
/// before accepting it: a client that is not allowed is told who was
/// refused and who was expected (its [`connect`] fails with
/// [`HandshakeError::NotAuthorized`]), and this returns
/// [`HandshakeError::Unauthorized`].
pub fn accept_authorized(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
    allowed: &Allowed,
    timeout: Duration,
) -> Result<(TlsStream, PeerIdentity), HandshakeError> {
    let peer = format!("the client at {}", peer_addr(&tcp));
    accept_inner(tcp, config, Some(allowed), timeout, &peer).inspect_err(|e| {
        tracing::warn!("refused a TLS connection: {e}");
    })
}

fn accept_inner(
    mut tcp: TcpStream,
    config: &Arc<ServerConfig>,
    allowed: Option<&Allowed>,
    timeout: Duration,
    peer: &str,
) -> Result<(TlsStream, PeerIdentity), HandshakeError> {
    let mut conn = ServerConnection::new(config.clone()).map_err(|source| HandshakeError::Tls {
        peer: peer.to_string(),
        source,
    })?;
    let saved = Timeouts::save(&tcp, peer)?;
    let ctx = Ctx {
        peer,
        expected: None,
        timeout,
        deadline: Instant::now() + timeout,
    };
    drive(&mut conn, &mut tcp, &ctx, |conn| Ok(!conn.is_handshaking()))?;
    let identity = match PeerIdentity::from_connection(&conn) {
        Ok(identity) => identity,
        Err(source) => {
            // Tell the client we are done with it rather than leave it
            // waiting for the accept byte.
            conn.send_close_notify();
            if let Err(e) = flush_tls(&mut conn, &mut tcp, &ctx) {
                tracing::debug!("sending close_notify to {peer}: {e}");
            }
            return Err(HandshakeError::NoFerryIdentity {
                peer: peer.to_string(),
                source,
            });
        }
    };
    if let Some(Err(refused)) = allowed.map(|allowed| authorize(&identity, allowed)) {
        let mut reply = vec![REFUSED];
        reply.extend_from_slice(refused.to_string().as_bytes());
        reply.push(b'\n');
        let told = conn
            .writer()
            .write_all(&reply)
            .map(|()| conn.send_close_notify());
        if let Err(e) = told
            .map_err(|e| ctx.io(e))
            .and_then(|()| flush_tls(&mut conn, &mut tcp, &ctx))
        {
            tracing::debug!("telling {peer} why it was refused: {e}");
        }
        return Err(HandshakeError::Unauthorized {
            peer: peer.to_string(),
            source: refused,
        });
    }
    conn.writer()
        .write_all(&[ACCEPTED])
        .map_err(|source| HandshakeError::Io {
            peer: peer.to_string(),
            source,
        })?;
    drive(&mut conn, &mut tcp, &ctx, |_| Ok(true))?;
    saved.restore(&tcp, peer)?;
    Ok((
        TlsStream {
            inner: Inner::Server(StreamOwned::new(conn, tcp)),
            peer: identity.clone(),
        },
        identity,
    ))
}

struct Ctx<'a> {
    peer: &'a str,
    /// The host the client meant to reach (client side only).
    expected: Option<&'a str>,
    timeout: Duration,
    deadline: Instant,
}

impl Ctx<'_> {
    fn remaining(&self) -> Result<Duration, HandshakeError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.timed_out())
    }

    fn timed_out(&self) -> HandshakeError {
        HandshakeError::Timeout {
            peer: self.peer.to_string(),
            timeout: self.timeout,
        }
    }

    fn io(&self, source: io::Error) -> HandshakeError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timed_out(),
            _ => HandshakeError::Io {
                peer: self.peer.to_string(),
                source,
            },
        }
    }
}

/// Moves TLS records between `conn` and `tcp` until `done` says so, within
/// the deadline. Writes everything rustls has queued first (so an alert
/// reaches the peer before we give up).
fn drive<C, S>(
    conn: &mut C,
    tcp: &mut TcpStream,
    ctx: &Ctx<'_>,
    mut done: impl FnMut(&mut C) -> Result<bool, HandshakeError>,
) -> Result<(), HandshakeError>
where
    C: std::ops::DerefMut<Target = ConnectionCommon<S>>,
    S: SideData,
{
    loop {
        flush_tls(conn, tcp, ctx)?;
        if done(conn)? {
            flush_tls(conn, tcp, ctx)?;
            return Ok(());
        }
        tcp.set_read_timeout(Some(ctx.remaining()?))
            .map_err(|e| ctx.io(e))?;
        match conn.read_tls(tcp) {
            Ok(0) => {
                return Err(HandshakeError::Closed {
                    peer: ctx.peer.to_string(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ctx.io(e)),
        }
        if let Err(e) = conn.process_new_packets() {
            // rustls has queued an alert that says why: deliver it.
            if let Err(w) = flush_tls(conn, tcp, ctx) {
                tracing::debug!("sending the TLS alert to {}: {w}", ctx.peer);
            }
            return Err(classify(e, ctx));
        }
    }
}

fn flush_tls<S: SideData>(
    conn: &mut ConnectionCommon<S>,
    tcp: &mut TcpStream,
    ctx: &Ctx<'_>,
) -> Result<(), HandshakeError> {
    while conn.wants_write() {
        tcp.set_write_timeout(Some(ctx.remaining()?))
            .map_err(|e| ctx.io(e))?;
        match conn.write_tls(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ctx.io(e)),
        }
    }
    Ok(())
}

/// Names a rustls error the way an operator can act on it.
fn classify(error: rustls::Error, ctx: &Ctx<'_>) -> HandshakeError {
    let peer = ctx.peer.to_string();
    match error {
        rustls::Error::InvalidCertificate(ref cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                HandshakeError::UnknownCa { peer }
            }
            CertificateError::Expired => HandshakeError::Expired {
                peer,
                detail: "expired".to_string(),
            },
            CertificateError::ExpiredContext { time, not_after } => HandshakeError::Expired {
                peer,
                detail: format!(
                    "not valid after {}, it is now {}",
                    show_unix_time(*not_after),
                    show_unix_time(*time)
                ),
            },
            CertificateError::NotValidYet => HandshakeError::NotYetValid {
                peer,
                detail: "not valid yet".to_string(),
            },
            CertificateError::NotValidYetContext { time, not_before } => {
                HandshakeError::NotYetValid {
                    peer,
                    detail: format!(
                        "not valid before {}, it is now {}",
                        show_unix_time(*not_before),
                        show_unix_time(*time)
                    ),
                }
            }
            CertificateError::NotValidForName => HandshakeError::WrongHost {
                peer,
                expected: ctx.expected.unwrap_or("?").to_string(),
                presented: "another name".to_string(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => {
                HandshakeError::WrongHost {
                    peer,
                    expected: ctx.expected.unwrap_or("?").to_string(),
                    presented: show_presented(presented),
                }
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                HandshakeError::WrongPurpose {
                    peer,
                    detail: error.to_string(),
                }
            }
            CertificateError::Other(other) if other.0.is::<PeerError>() => {
                HandshakeError::NoFerryIdentity {
                    peer,
                    source: other
                        .0
                        .downcast_ref::<PeerError>()
                        .cloned()
                        .unwrap_or(PeerError::NoFerryUri),
                }
            }
            _ => HandshakeError::Tls {
                peer,
                source: error,
            },
        },
        rustls::Error::NoCertificatesPresented => HandshakeError::NoClientCertificate { peer },
        rustls::Error::PeerIncompatible(why) => HandshakeError::Incompatible {
            peer,
            detail: format!("{why:?}"),
        },
        rustls::Error::AlertReceived(alert) => HandshakeError::RefusedByPeer {
            peer,
            alert: format!("{alert:?}"),
            hint: alert_hint(alert),
        },
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::PeerSentOversizedRecord => HandshakeError::NotTls {
            peer,
            detail: error.to_string(),
        },
        _ => HandshakeError::Tls {
            peer,
            source: error,
        },
    }
}

fn show_unix_time(t: rustls::pki_types::UnixTime) -> String {
    show_time(SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

/// The names webpki found in a certificate (`DnsName("hostC")`, ...) as
/// the Ferry identity they state if there is one, else the names.
fn show_presented(presented: &[String]) -> String {
    let values: Vec<&str> = presented
        .iter()
        .map(|p| {
            p.split_once("(\"")
                .and_then(|(_, rest)| rest.strip_suffix("\")"))
                .unwrap_or(p)
        })
        .collect();
    if let Some(identity) = values.iter().find_map(|v| PeerIdentity::parse_uri(v).ok()) {
        return identity.to_string();
    }
    if values.is_empty() {
        "no name".to_string()
    } else {
        values.join(", ")
    }
}

fn alert_hint(alert: AlertDescription) -> &'static str {
    match alert {
        AlertDescription::UnknownCA => {
            "it does not trust the CA that signed our certificate; both sides need the same fleet ca.crt"
        }
        AlertDescription::CertificateExpired => {
            "it says our certificate has expired or is not valid yet; reissue it, or check the clocks"
        }
        AlertDescription::BadCertificate => {
            "it rejected our certificate (wrong host name, or not made by `ferry ca issue`)"
        }
        AlertDescription::CertificateRequired => {
            "it requires a client certificate; connect with an identity (`--tls DIR`)"
        }
        AlertDescription::UnsupportedCertificate => {
            "our certificate may not be used for this connection"
        }
        AlertDescription::ProtocolVersion => "it does not speak TLS 1.3",
        AlertDescription::NoApplicationProtocol => {
            "we offered no application protocol (ALPN) it accepts"
        }
        _ => "see its log for the reason",
    }
}

fn peer_addr(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "an unknown address".to_string())
}

/// The socket timeouts the caller had, put back after the handshake.
struct Timeouts {
    read: Option<Duration>,
    write: Option<Duration>,
}

impl Timeouts {
    fn save(tcp: &TcpStream, peer: &str) -> Result<Self, HandshakeError> {
        let io = |source| HandshakeError::Io {
            peer: peer.to_string(),
            source,
        };
        Ok(Timeouts {
            read: tcp.read_timeout().map_err(io)?,
            write: tcp.write_timeout().map_err(io)?,
        })
    }

    fn restore(self, tcp: &TcpStream, peer: &str) -> Result<(), HandshakeError> {
        let io = |source| HandshakeError::Io {
            peer: peer.to_string(),
            source,
        };
        tcp.set_read_timeout(self.read).map_err(io)?;
        tcp.set_write_timeout(self.write).map_err(io)
    }
}
