//! The fleet's identities: a private CA, host certificates, mutually authenticated TLS 1.3, and the peer's identity.
//!
//! - [`ca`]: `ferry ca init` / `ferry ca issue`: a private CA (rcgen) that
//!   signs host certificates (ServerAuth + ClientAuth, SAN DNS = name, the
//!   given IPs, and the URI `ferry://host/NAME`) and operator certificates
//!   (ClientAuth, `ferry://operator/NAME`).
//! - [`Identity::load`]: an identity directory (`ca.crt`, `cert.pem`,
//!   `key.pem`), checked before it is used.
//! - [`server_config`] / [`client_config`]: rustls, TLS 1.3 only, both
//!   sides authenticated against the fleet CA and nothing else.
//! - [`PeerIdentity`] and [`authorize`]: who the verified peer is, and
//!   whether it is allowed here (deny by default).
//! - [`connect`] / [`accept_authorized`]: a blocking [`TlsStream`] over a
//!   `TcpStream` for the migration data plane.
//!
//! A destination that expects the migration hostA prepared, and the source:
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use std::path::Path;
//! use ferry_identity::{tls, Allowed, Identity, ALPN_MIGRATION, HANDSHAKE_TIMEOUT};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // On hostB:
//! let me = Identity::load(Path::new("/etc/ferry/identity"))?;
//! let server = ferry_identity::server_config(&me, &[ALPN_MIGRATION])?;
//! let listener = TcpListener::bind("0.0.0.0:7070")?;
//! for tcp in listener.incoming() {
//!     // A stranger, a plaintext client or the wrong host is refused and
//!     // logged; keep waiting for the source we prepared for.
//!     let Ok((mut stream, _peer)) =
//!         tls::accept_authorized(tcp?, &server, &Allowed::hosts(["hostA"]), HANDSHAKE_TIMEOUT)
//!     else {
//!         continue;
//!     };
//!     let mut frame = [0u8; 4];
//!     stream.read_exact(&mut frame)?;
//!     break;
//! }
//!
//! // On hostA:
//! let me = Identity::load(Path::new("/etc/ferry/identity"))?;
//! let client = ferry_identity::client_config(&me, &[ALPN_MIGRATION])?;
//! let mut stream = ferry_identity::connect(TcpStream::connect("10.0.0.2:7070")?, &client, "hostB")?;
//! stream.write_all(b"FRY1")?;
//! # Ok(())
//! # }
//! ```

pub mod authz;
pub mod ca;
mod files;
pub mod identity;
pub mod names;
pub mod peer;
pub mod tls;
mod verify;

pub use authz::{authorize, Allowed, AuthzError};
pub use ca::{CaError, CertificateAuthority, IssueRequest, IssuedCert, Validity};
pub use identity::{Identity, IdentityError};
pub use names::{validate_name, NameError};
pub use peer::{PeerError, PeerIdentity, Role};
pub use tls::{
    accept, accept_authorized, client_config, connect, server_config, ConfigError, HandshakeError,
    TlsStream, ALPN_MIGRATION, HANDSHAKE_TIMEOUT,
};
