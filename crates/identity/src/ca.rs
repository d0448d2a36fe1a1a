//! The fleet's private certificate authority: makes the CA, and signs host
//! and operator certificates whose `ferry://ROLE/NAME` URI states who holds
//! them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::files;
use crate::identity::{cert_times, show_time};
use crate::names::{validate_dns_name, validate_name, NameError};
use crate::peer::{PeerIdentity, Role};

/// File name of the CA certificate, in a CA directory and in every identity.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA's private key (only in the CA directory).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of an identity's certificate.
pub const CERT_FILE: &str = "cert.pem";
/// File name of an identity's private key.
pub const KEY_FILE: &str = "key.pem";

/// The common name of a CA made without `--name`.
pub const DEFAULT_CA_NAME: &str = "Ferry fleet CA";

/// How far back a validity made by [`Validity::days`] starts, so that a
/// host whose clock runs a little behind accepts a certificate just made.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest validity accepted, in days (about a century).
pub const MAX_DAYS: u32 = 36_500;

/// What went wrong making the CA or a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("a CA already exists in {dir} ({file} is there): nothing was changed; use another directory, or issue certificates with this one")]
    CaExists { dir: PathBuf, file: PathBuf },
    #[error("{dir} holds no CA ({file} is missing): make one with `ferry ca init {dir}`")]
    NoCa { dir: PathBuf, file: PathBuf },
    #[error(
        "an identity already exists in {dir}: nothing was changed; pass --force to replace it"
    )]
    IdentityExists { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PEM {expected}: {detail}")]
    BadPem {
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    #[error(
        "{key} is not the private key of the CA certificate {cert}: restore the matching pair"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{path} is readable by group or others (mode {mode:03o}): run `chmod 600 {path}`")]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("the CA in {cert} expired on {not_after}: make a new CA and reissue every identity")]
    CaExpired { cert: PathBuf, not_after: String },
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("the CA name must be 1-64 printable characters, got {0:?}")]
    BadCaName(String),
    #[error("validity of {0} days: give 1 to {MAX_DAYS} days")]
    BadDays(u32),
    #[error("the validity ends ({not_after}) before it starts ({not_before})")]
    EmptyValidity {
        not_before: String,
        not_after: String,
    },
    #[error("an operator certificate names no addresses; drop --ip and --dns for --operator")]
    OperatorAddresses,
    #[error("making the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a few minutes ago ([`CLOCK_SKEW`]) to `days` days from now.
    pub fn days(days: u32) -> Result<Self, CaError> {
        if days == 0 || days > MAX_DAYS {
            return Err(CaError::BadDays(days));
        }
        let now = SystemTime::now();
        Ok(Validity {
            not_before: now - CLOCK_SKEW,
            not_after: now + DAY * days,
        })
    }

    /// An explicit window (tests make expired or not-yet-valid
    /// certificates with it).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Result<Self, CaError> {
        if not_after <= not_before {
            return Err(CaError::EmptyValidity {
                not_before: show_time(not_before),
                not_after: show_time(not_after),
            });
        }
        Ok(Validity {
            not_before,
            not_after,
        })
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
    }
}

/// What to certify.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub name: String,
    pub role: Role,
    /// Addresses the host is reached at (hosts only).
    pub ips: Vec<IpAddr>,
    /// DNS names besides `name` (hosts only).
    pub dns: Vec<String>,
    pub validity: Validity,
}

impl IssueRequest {
    /// A host certificate valid for 365 days.
    pub fn host(name: impl Into<String>) -> Self {
        Self::new(name.into(), Role::Host)
    }

    /// An operator certificate valid for 365 days.
    pub fn operator(name: impl Into<String>) -> Self {
        Self::new(name.into(), Role::Operator)
    }

    fn new(name: String, role: Role) -> Self {
        IssueRequest {
            name,
            role,
            ips: Vec::new(),
            dns: Vec::new(),
            validity: Validity::days(365).expect("365 days is a valid validity"),
        }
    }

    /// Also an IP address.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }

    /// Also a DNS name.
    pub fn dns(mut self, name: impl Into<String>) -> Self {
        self.dns.push(name.into());
        self
    }

    /// Another validity window.
    pub fn validity(mut self, validity: Validity) -> Self {
        self.validity = validity;
        self
    }
}

/// A certificate and its new private key, both PEM, and the CA certificate
/// that signed it: the three files of an identity.
#[derive(Clone)]
pub struct IssuedCert {
    pub identity: PeerIdentity,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub validity: Validity,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity)
            .field("dns", &self.dns)
            .field("ips", &self.ips)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// What `ferry ca init` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub name: String,
    pub validity: Validity,
}

/// What `ferry ca issue` wrote: the identity directory and its three files.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub issued: IssuedCert,
}

/// A CA whose key is at hand: it signs certificates.
pub struct CertificateAuthority {
    name: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    validity: Validity,
    /// Where it was loaded from, for messages.
    origin: PathBuf,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA in memory, named `name` (its certificate's common name).
    pub fn generate(name: &str, validity: Validity) -> Result<Self, CaError> {
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(CaError::BadCaName(name.to_string()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Ferry");
        params.distinguished_name = dn;
        // It signs end-entity certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity.apply(&mut params);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            name: name.to_string(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            issuer: Issuer::new(params, key),
            validity,
            origin: PathBuf::from("(in memory)"),
        })
    }

    /// Makes a CA and writes `dir/ca.crt` and `dir/ca.key` (mode 0600 from
    /// its creation). Refuses, changing nothing, if either exists.
    pub fn init(dir: &Path, name: &str, validity: Validity) -> Result<CaFiles, CaError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        for file in [&cert, &key] {
            if file.exists() {
                return Err(CaError::CaExists {
                    dir: dir.to_path_buf(),
                    file: file.clone(),
                });
            }
        }
        let ca = Self::generate(name, validity)?;
        files::create_private_dir(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        files::write_set(
            &[
                (&key, ca.key_pem.as_bytes(), files::SECRET_MODE),
                (&cert, ca.cert_pem.as_bytes(), files::PUBLIC_MODE),
            ],
            false,
        )
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                // Another `ca init` got there between the check and now.
                CaError::CaExists {
                    dir: dir.to_path_buf(),
                    file: cert.clone(),
                }
            } else {
                CaError::Io {
                    path: dir.to_path_buf(),
                    source,
                }
            }
        })?;
        Ok(CaFiles {
            dir: dir.to_path_buf(),
            cert,
            key,
            name: ca.name,
            validity,
        })
    }

    /// Loads the CA of `dir` (`ca.crt`, `ca.key`) to sign with.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    CaError::NoCa {
                        dir: dir.to_path_buf(),
                        file: path.to_path_buf(),
                    }
                } else {
                    CaError::Io {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        if let Some(mode) = files::insecure_mode(&key_path).map_err(|source| CaError::Io {
            path: key_path.clone(),
            source,
        })? {
            return Err(CaError::InsecureKey {
                path: key_path,
                mode,
            });
        }
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::BadPem {
                path: cert_path.clone(),
                expected: "CERTIFICATE",
                detail: e.to_string(),
            })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadPem {
            path: key_path.clone(),
            expected: "PRIVATE KEY",
            detail: e.to_string(),
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert_der.as_ref()).map_err(|e| {
            CaError::BadPem {
                path: cert_path.clone(),
                expected: "CERTIFICATE",
                detail: e.to_string(),
            }
        })?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or(DEFAULT_CA_NAME)
            .to_string();
        let (not_before, not_after) = cert_times(&parsed);
        let validity = Validity {
            not_before,
            not_after,
        };
        if not_after <= SystemTime::now() {
            return Err(CaError::CaExpired {
                cert: cert_path,
                not_after: show_time(not_after),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(CertificateAuthority {
            name,
            cert_pem,
            cert_der,
            key_pem,
            issuer,
            validity,
            origin: dir.to_path_buf(),
        })
    }

    /// The CA's common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate is valid.
    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// Signs a new certificate and key for `request`. A validity that
    /// would outlast the CA is cut to the CA's end (a certificate is no
    /// use once its CA has expired).
    pub fn issue(&self, request: &IssueRequest) -> Result<IssuedCert, CaError> {
        validate_name(&request.name)?;
        for dns in &request.dns {
            validate_dns_name(dns)?;
        }
        if request.role == Role::Operator && !(request.ips.is_empty() && request.dns.is_empty()) {
            return Err(CaError::OperatorAddresses);
        }
        let validity = Validity::between(
            request.validity.not_before,
            request.validity.not_after.min(self.validity.not_after),
        )?;
        let identity = PeerIdentity {
            role: request.role,
            name: request.name.clone(),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.name.as_str());
        dn.push(DnType::OrganizationName, "Ferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let mut dns = Vec::new();
        match request.role {
            Role::Host => {
                // QEMU's tls-creds-x509 (GnuTLS) refuses a certificate
                // whose critical key usage lacks keyEncipherment, even for
                // an ECDSA key where it means nothing; with it, a host's
                // certificate serves a QEMU migration too (the bench).
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                dns.push(request.name.clone());
                for extra in &request.dns {
                    if !dns.iter().any(|d| d.eq_ignore_ascii_case(extra)) {
                        dns.push(extra.clone());
                    }
                }
                for name in &dns {
                    params
                        .subject_alt_names
                        .push(SanType::DnsName(name.as_str().try_into()?));
                }
                for ip in &request.ips {
                    params.subject_alt_names.push(SanType::IpAddress(*ip));
                }
            }
            Role::Operator => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().as_str().try_into()?));
        validity.apply(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            identity,
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            dns,
            ips: request.ips.clone(),
            validity,
        })
    }

    /// Issues for `request` and writes the identity directory
    /// `ca_dir/NAME/` (ca.crt, cert.pem, key.pem mode 0600). Refuses to
    /// replace an existing identity unless `force`.
    pub fn issue_into(
        &self,
        ca_dir: &Path,
        request: &IssueRequest,
        force: bool,
    ) -> Result<IdentityFiles, CaError> {
        validate_name(&request.name)?;
        let dir = ca_dir.join(&request.name);
        let ca = dir.join(CA_CERT_FILE);
        let cert = dir.join(CERT_FILE);
        let key = dir.join(KEY_FILE);
        if !force && [&ca, &cert, &key].iter().any(|f| f.exists()) {
            return Err(CaError::IdentityExists { dir });
        }
        let issued = self.issue(request)?;
        let io = |source| CaError::Io {
            path: dir.clone(),
            source,
        };
        files::create_private_dir(&dir).map_err(io)?;
        files::write_set(
            &[
                (&key, issued.key_pem.as_bytes(), files::SECRET_MODE),
                (&cert, issued.cert_pem.as_bytes(), files::PUBLIC_MODE),
                (&ca, issued.ca_pem.as_bytes(), files::PUBLIC_MODE),
            ],
            force,
        )
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CaError::IdentityExists { dir: dir.clone() }
            } else {
                io(source)
            }
        })?;
        Ok(IdentityFiles {
            dir: dir.clone(),
            ca,
            cert,
            key,
            issued,
        })
    }
}

/// `ferry ca init DIR [--name NAME] [--days N]`.
pub fn init_ca(dir: &Path, name: &str, days: u32) -> Result<CaFiles, CaError> {
    CertificateAuthority::init(dir, name, Validity::days(days)?)
}

/// `ferry ca issue ... DIR`: signs with DIR's CA, writes `DIR/NAME/`.
pub fn issue(ca_dir: &Path, request: &IssueRequest, force: bool) -> Result<IdentityFiles, CaError> {
    CertificateAuthority::load(ca_dir)?.issue_into(ca_dir, request, force)
}
