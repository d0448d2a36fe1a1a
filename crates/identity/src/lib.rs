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
//! - [`connect`] / [`accept`]: a blocking [`TlsStream`] over a
//!   `TcpStream` for the migration data plane.

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
