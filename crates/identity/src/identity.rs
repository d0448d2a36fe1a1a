//! This host's (or operator's) identity, loaded from an identity directory
//! (`ca.crt`, `cert.pem`, `key.pem`) and checked before any connection is
//! tried: the key matches, the CA signed the certificate, it is valid now.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;

use crate::ca::{CA_CERT_FILE, CERT_FILE, KEY_FILE};
use crate::files;
use crate::peer::{PeerError, PeerIdentity, Role};

/// What is wrong with an identity directory or its files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path} is missing ({what}): make an identity with `ferry ca issue --name NAME CA_DIR` and copy CA_DIR/NAME/ here")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:03o}): run `chmod 600 {path}`")]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("{source_name} is not a PEM {expected}: {detail}")]
    BadPem {
        source_name: String,
        expected: &'static str,
        detail: String,
    },
    #[error("{key} is not the private key of {cert}: put the key that was issued with this certificate beside it")]
    KeyMismatch { key: String, cert: String },
    #[error("{cert} was not issued by the CA in {ca} ({detail}): use the ca.crt that came with this certificate, or issue a new one from this fleet's CA")]
    NotSignedByCa {
        cert: String,
        ca: String,
        detail: String,
    },
    #[error("{cert} expired on {not_after}: issue a new one with `ferry ca issue --force --name NAME CA_DIR`")]
    Expired { cert: String, not_after: String },
    #[error("{cert} is not valid before {not_before}: is this host's clock right?")]
    NotYetValid { cert: String, not_before: String },
    #[error("{cert}: {source}")]
    NoFerryIdentity {
        cert: String,
        #[source]
        source: PeerError,
    },
}

/// A checked identity: the fleet CA to trust, our certificate and key.
pub struct Identity {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    me: PeerIdentity,
    not_after: SystemTime,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("me", &self.me)
            .field("not_after", &show_time(self.not_after))
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            me: self.me.clone(),
            not_after: self.not_after,
            dir: self.dir.clone(),
        }
    }
}

impl Identity {
    /// Loads and checks `dir/ca.crt`, `dir/cert.pem`, `dir/key.pem`. The
    /// key file must not be readable by group or others.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let read = |path: &Path, what| {
            std::fs::read(path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    IdentityError::Missing {
                        path: path.to_path_buf(),
                        what,
                    }
                } else {
                    IdentityError::Io {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })
        };
        let ca = read(&ca_path, "the fleet CA certificate")?;
        let cert = read(&cert_path, "this identity's certificate")?;
        let key = read(&key_path, "this identity's private key")?;
        if let Some(mode) = files::insecure_mode(&key_path).map_err(|source| IdentityError::Io {
            path: key_path.clone(),
            source,
        })? {
            return Err(IdentityError::InsecureKey {
                path: key_path,
                mode,
            });
        }
        let mut identity = Self::check(
            Sources {
                ca: &ca,
                ca_name: &ca_path.display().to_string(),
                cert: &cert,
                cert_name: &cert_path.display().to_string(),
                key: &key,
                key_name: &key_path.display().to_string(),
            },
            SystemTime::now(),
        )?;
        identity.dir = Some(dir.to_path_buf());
        Ok(identity)
    }

    /// An identity from PEM text in memory, checked as [`Identity::load`]
    /// checks files.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        Self::from_pem_at(ca_pem, cert_pem, key_pem, SystemTime::now())
    }

    /// As [`Identity::from_pem`], checking validity at `now` instead of the
    /// clock (tests load an expired certificate this way, to see a peer
    /// refuse it).
    pub fn from_pem_at(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        now: SystemTime,
    ) -> Result<Self, IdentityError> {
        Self::check(
            Sources {
                ca: ca_pem.as_bytes(),
                ca_name: "the CA certificate",
                cert: cert_pem.as_bytes(),
                cert_name: "the certificate",
                key: key_pem.as_bytes(),
                key_name: "the private key",
            },
            now,
        )
    }

    fn check(src: Sources<'_>, now: SystemTime) -> Result<Self, IdentityError> {
        let bad_pem = |source_name: &str, expected, detail: String| IdentityError::BadPem {
            source_name: source_name.to_string(),
            expected,
            detail,
        };
        let ca = CertificateDer::from_pem_slice(src.ca)
            .map_err(|e| bad_pem(src.ca_name, "CERTIFICATE", e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(src.cert)
            .map_err(|e| bad_pem(src.cert_name, "CERTIFICATE", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(src.key)
            .map_err(|e| bad_pem(src.key_name, "PRIVATE KEY", e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| bad_pem(src.cert_name, "CERTIFICATE", e.to_string()))?;

        // The key must be the certificate's, or every handshake would fail
        // with a signature error nobody could read.
        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| bad_pem(src.key_name, "PRIVATE KEY", e.to_string()))?;
        let matches = signing_key
            .public_key()
            .is_some_and(|spki| spki.as_ref() == parsed.public_key().raw);
        if !matches {
            return Err(IdentityError::KeyMismatch {
                key: src.key_name.to_string(),
                cert: src.cert_name.to_string(),
            });
        }

        let (not_before, not_after) = cert_times(&parsed);
        if now >= not_after {
            return Err(IdentityError::Expired {
                cert: src.cert_name.to_string(),
                not_after: show_time(not_after),
            });
        }
        if now < not_before {
            return Err(IdentityError::NotYetValid {
                cert: src.cert_name.to_string(),
                not_before: show_time(not_before),
            });
        }

        let me = PeerIdentity::from_certificate(&cert).map_err(|source| {
            IdentityError::NoFerryIdentity {
                cert: src.cert_name.to_string(),
                source,
            }
        })?;

        // The same check a peer will make: the chain to the CA, as a
        // client certificate (every Ferry certificate has ClientAuth).
        let not_signed = |detail: String| IdentityError::NotSignedByCa {
            cert: src.cert_name.to_string(),
            ca: src.ca_name.to_string(),
            detail,
        };
        let verifier = client_verifier(&ca, provider).map_err(|e| not_signed(e.to_string()))?;
        verifier
            .verify_client_cert(&cert, &[], unix_time(now))
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    not_signed("unknown issuer".to_string())
                }
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => not_signed("the CA certificate has expired".to_string()),
                other => not_signed(other.to_string()),
            })?;

        Ok(Identity {
            ca,
            cert,
            key,
            me,
            not_after,
            dir: None,
        })
    }

    /// Who this identity says we are.
    pub fn me(&self) -> &PeerIdentity {
        &self.me
    }

    /// Our name.
    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.me.role
    }

    /// When our certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The directory it was loaded from, if it was.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The fleet CA certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Our certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// Trust only the fleet CA.
    pub(crate) fn roots(&self) -> Result<Arc<RootCertStore>, rustls::Error> {
        roots(&self.ca)
    }
}

struct Sources<'a> {
    ca: &'a [u8],
    ca_name: &'a str,
    cert: &'a [u8],
    cert_name: &'a str,
    key: &'a [u8],
    key_name: &'a str,
}

/// The one crypto provider Ferry uses: ring, TLS 1.3 suites only, AES-128-GCM
/// first (the fastest with AES-NI: guest memory is bulk data).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// A verifier requiring a client certificate that chains to `ca`.
pub(crate) fn client_verifier(
    ca: &CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, VerifierError> {
    let roots = roots(ca).map_err(VerifierError::Root)?;
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(VerifierError::Build)
}

/// Why a verifier could not be built (a CA certificate webpki rejects).
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("the CA certificate cannot be a trust anchor: {0}")]
    Root(rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Build(rustls::server::VerifierBuilderError),
}

fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
}

/// A certificate's validity window.
pub(crate) fn cert_times(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> (SystemTime, SystemTime) {
    let at = |secs: i64| {
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let validity = cert.validity();
    (
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
    )
}

/// A time as people read it: `2027-12-02T03:10:00Z`.
pub fn show_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or_else(|_| t.into());
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t}"))
}
