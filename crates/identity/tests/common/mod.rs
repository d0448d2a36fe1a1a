//! Helpers shared by the identity tests: temporary directories, and
//! identities made by the project's own CA code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use ferry_identity::{CertificateAuthority, Identity, IssueRequest, Validity};

pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// A directory under the system's temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferry-identity-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

pub fn new_ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate(name, Validity::days(30).unwrap()).unwrap()
}

/// An identity issued by `ca` for `request`, checked at the current time.
pub fn identity(ca: &CertificateAuthority, request: IssueRequest) -> Identity {
    let issued = ca.issue(&request).unwrap();
    Identity::from_pem(&issued.ca_pem, &issued.cert_pem, &issued.key_pem).unwrap()
}

/// An identity valid only from `from` to `until`, loaded as if it were
/// the middle of that window (so it can be presented after it expired).
pub fn identity_valid(
    ca: &CertificateAuthority,
    request: IssueRequest,
    from: SystemTime,
    until: SystemTime,
) -> Identity {
    let request = request.validity(Validity::between(from, until).unwrap());
    let issued = ca.issue(&request).unwrap();
    let middle = from + (until.duration_since(from).unwrap() / 2);
    Identity::from_pem_at(&issued.ca_pem, &issued.cert_pem, &issued.key_pem, middle).unwrap()
}
