//! Who is on the other end: the role and name a verified certificate states
//! in its `ferry://ROLE/NAME` URI.

use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::names::validate_name;

/// The URI scheme of a Ferry identity in a certificate's subject
/// alternative names.
pub const URI_SCHEME: &str = "ferry://";

/// What a certificate's holder may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A host of the fleet (`ferryd`, a migration source or destination):
    /// serves and connects.
    Host,
    /// A person or program driving the fleet: connects only.
    Operator,
}

impl Role {
    /// The role's segment in a `ferry://` URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Operator => "operator",
        }
    }

    fn parse(segment: &str) -> Option<Role> {
        match segment {
            "host" => Some(Role::Host),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a verified certificate states.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

/// A certificate that states no usable Ferry identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has no `ferry://host/NAME` or `ferry://operator/NAME` URI in its subject alternative names: it was not made by `ferry ca issue`")]
    NoFerryUri,
    #[error("the certificate states several Ferry identities ({0}); refusing to pick one")]
    SeveralFerryUris(String),
    #[error("the certificate's URI `{uri}` is not a Ferry identity: {reason}")]
    BadFerryUri { uri: String, reason: String },
}

impl PeerIdentity {
    /// A host's identity.
    pub fn host(name: impl Into<String>) -> Self {
        PeerIdentity {
            role: Role::Host,
            name: name.into(),
        }
    }

    /// An operator's identity.
    pub fn operator(name: impl Into<String>) -> Self {
        PeerIdentity {
            role: Role::Operator,
            name: name.into(),
        }
    }

    /// The URI that states this identity in a certificate:
    /// `ferry://host/hostB`.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.name)
    }

    /// Whether this is the host `name`. Names compare as DNS names do,
    /// ignoring ASCII case.
    pub fn is_host(&self, name: &str) -> bool {
        self.role == Role::Host && self.name.eq_ignore_ascii_case(name)
    }

    /// Reads the identity from a certificate's `ferry://` URI. The
    /// certificate must already be verified (by the TLS handshake or
    /// [`crate::Identity::load`]); this only reads what it says.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Result<Self, PeerError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PeerError::Unparsable(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PeerError::Unparsable(e.to_string()))?
            .ok_or(PeerError::NoFerryUri)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(URI_SCHEME) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(PeerError::NoFerryUri),
            [uri] => Self::parse_uri(uri),
            several => Err(PeerError::SeveralFerryUris(several.join(", "))),
        }
    }

    /// The identity of the peer of a TLS connection whose handshake is
    /// complete: its first (end-entity) certificate.
    pub fn from_connection(conn: &rustls::CommonState) -> Result<Self, PeerError> {
        let cert = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(PeerError::NoCertificate)?;
        Self::from_certificate(cert)
    }

    /// Parses `ferry://ROLE/NAME`.
    pub fn parse_uri(uri: &str) -> Result<Self, PeerError> {
        let bad = |reason: String| PeerError::BadFerryUri {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| bad(format!("it does not start with {URI_SCHEME}")))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected ferry://ROLE/NAME".to_string()))?;
        let role = Role::parse(role)
            .ok_or_else(|| bad(format!("unknown role `{role}` (expected host or operator)")))?;
        validate_name(name).map_err(|e| bad(e.to_string()))?;
        Ok(PeerIdentity {
            role,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_refused() {
        for id in [PeerIdentity::host("hostB"), PeerIdentity::operator("alice")] {
            assert_eq!(PeerIdentity::parse_uri(&id.uri()).unwrap(), id);
        }
        for bad in [
            "ferry://host/",
            "ferry://host",
            "ferry://admin/alice",
            "ferry://host/a/b",
            "ferry://host/-x",
            "https://host/hostB",
        ] {
            let err = PeerIdentity::parse_uri(bad).unwrap_err();
            assert!(matches!(err, PeerError::BadFerryUri { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn host_names_compare_like_dns_names() {
        let id = PeerIdentity::host("hostB");
        assert!(id.is_host("hostb"));
        assert!(!id.is_host("hostC"));
        assert!(!PeerIdentity::operator("hostB").is_host("hostB"));
    }
}
