//! The CA and identity directories on disk: what `ferry ca init` and
//! `ferry ca issue` write, and every way `Identity::load` refuses a bad
//! identity with a message that says what to do.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use common::{TempDir, DAY};
use ferry_identity::ca::{self, CaError, CertificateAuthority};
use ferry_identity::{Identity, IdentityError, IssueRequest, PeerIdentity, Role, Validity};
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = if path.is_file() {
                fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            (path.display().to_string(), bytes, mode(&path))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn init_writes_a_ca_with_a_private_key_and_refuses_a_second_time() {
    let tmp = TempDir::new("init");
    let dir = tmp.path().join("ca");
    let written = ca::init_ca(&dir, "Test fleet", 10).unwrap();
    assert_eq!(written.cert, dir.join("ca.crt"));
    assert_eq!(mode(&written.key), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let before = snapshot(&dir);

    let err = ca::init_ca(&dir, "Again", 10).unwrap_err();
    assert!(matches!(err, CaError::CaExists { .. }), "{err}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(snapshot(&dir), before);

    let loaded = CertificateAuthority::load(&dir).unwrap();
    assert_eq!(loaded.name(), "Test fleet");
}

#[test]
fn issue_writes_a_ready_identity_that_loads() {
    let tmp = TempDir::new("issue");
    ca::init_ca(tmp.path(), ca::DEFAULT_CA_NAME, 10).unwrap();
    let request = IssueRequest::host("hostB")
        .ip("10.0.0.2".parse().unwrap())
        .dns("hostb.example.org");
    let files = ca::issue(tmp.path(), &request, false).unwrap();
    assert_eq!(files.dir, tmp.path().join("hostB"));
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(
        fs::read(&files.ca).unwrap(),
        fs::read(tmp.path().join("ca.crt")).unwrap()
    );
    let names: Vec<_> = fs::read_dir(&files.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.contains("ca.key")), "{names:?}");

    let identity = Identity::load(&files.dir).unwrap();
    assert_eq!(identity.me(), &PeerIdentity::host("hostB"));
    assert_eq!(identity.dir(), Some(files.dir.as_path()));

    // What the certificate says: EKU, SANs, not a CA.
    let (_, cert) = x509_parser::parse_x509_certificate(identity.cert().as_ref()).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let mut sans: Vec<String> = san
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect();
    sans.sort();
    assert_eq!(
        sans,
        [
            "DNS:hostB",
            "DNS:hostb.example.org",
            "IP:[10, 0, 0, 2]",
            "URI:ferry://host/hostB"
        ]
    );
    assert!(!cert.is_ca());
    let has_basic_constraints = cert
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::BasicConstraints(b) if !b.ca));
    assert!(has_basic_constraints);
}

#[test]
fn an_operator_certificate_is_client_only() {
    let tmp = TempDir::new("operator");
    ca::init_ca(tmp.path(), "fleet", 10).unwrap();
    let files = ca::issue(tmp.path(), &IssueRequest::operator("alice"), false).unwrap();
    let identity = Identity::load(&files.dir).unwrap();
    assert_eq!(identity.role(), Role::Operator);
    let (_, cert) = x509_parser::parse_x509_certificate(identity.cert().as_ref()).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);

    let err = ca::issue(
        tmp.path(),
        &IssueRequest::operator("bob").ip("10.0.0.9".parse().unwrap()),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, CaError::OperatorAddresses), "{err}");
}

#[test]
fn issue_refuses_to_overwrite_unless_forced_and_refuses_bad_names() {
    let tmp = TempDir::new("force");
    ca::init_ca(tmp.path(), "fleet", 10).unwrap();
    let first = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false).unwrap();
    let before = snapshot(&first.dir);
    let err = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false).unwrap_err();
    assert!(matches!(err, CaError::IdentityExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(snapshot(&first.dir), before);

    let again = ca::issue(tmp.path(), &IssueRequest::host("hostA"), true).unwrap();
    assert_ne!(fs::read(&again.cert).unwrap(), before[1].1);
    assert_eq!(mode(&again.key), 0o600);
    Identity::load(&again.dir).unwrap();
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(&again.dir).unwrap().count(), 3);

    for bad in ["../evil", "host_b", "-x", "", "a.b"] {
        let err = ca::issue(tmp.path(), &IssueRequest::host(bad), false).unwrap_err();
        assert!(matches!(err, CaError::BadName(_)), "{bad:?}: {err}");
    }
    assert!(!tmp.path().join("evil").exists());
}

#[test]
fn issue_without_a_ca_says_how_to_make_one() {
    let tmp = TempDir::new("noca");
    let err = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false).unwrap_err();
    assert!(matches!(err, CaError::NoCa { .. }), "{err}");
    assert!(err.to_string().contains("ferry ca init"), "{err}");
}

/// A CA dir and one issued identity in it.
fn fleet(tag: &str) -> (TempDir, std::path::PathBuf) {
    let tmp = TempDir::new(tag);
    ca::init_ca(tmp.path(), "fleet", 10).unwrap();
    let dir = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false)
        .unwrap()
        .dir;
    (tmp, dir)
}

#[test]
fn load_refuses_a_missing_file() {
    let (_tmp, dir) = fleet("missing");
    fs::remove_file(dir.join("key.pem")).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("key.pem is missing"), "{err}");
}

#[test]
fn load_refuses_a_key_others_can_read() {
    let (_tmp, dir) = fleet("mode");
    let key = dir.join("key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(
        matches!(err, IdentityError::InsecureKey { mode: 0o640, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
}

#[test]
fn load_refuses_the_wrong_pem() {
    let (_tmp, dir) = fleet("pem");
    // The key where the certificate should be.
    fs::copy(dir.join("key.pem"), dir.join("cert.pem")).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::BadPem { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("cert.pem is not a PEM CERTIFICATE"),
        "{err}"
    );

    let (_tmp, dir) = fleet("pem2");
    fs::write(dir.join("ca.crt"), "hello").unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::BadPem { .. }), "{err}");
}

#[test]
fn load_refuses_a_key_that_is_not_the_certificates() {
    let (tmp, dir) = fleet("mismatch");
    let other = ca::issue(tmp.path(), &IssueRequest::host("hostB"), false).unwrap();
    fs::write(dir.join("key.pem"), fs::read(&other.key).unwrap()).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("is not the private key of"),
        "{err}"
    );
}

#[test]
fn load_refuses_a_certificate_another_ca_signed() {
    let (_tmp, dir) = fleet("otherca");
    let other = TempDir::new("otherca-ca");
    ca::init_ca(other.path(), "other fleet", 10).unwrap();
    fs::copy(other.path().join("ca.crt"), dir.join("ca.crt")).unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::NotSignedByCa { .. }), "{err}");
    assert!(
        err.to_string().contains("was not issued by the CA"),
        "{err}"
    );
}

#[test]
fn load_refuses_an_expired_or_future_certificate() {
    let tmp = TempDir::new("expired");
    ca::init_ca(tmp.path(), "fleet", 10).unwrap();
    let now = SystemTime::now();
    let expired =
        IssueRequest::host("old").validity(Validity::between(now - 10 * DAY, now - DAY).unwrap());
    let dir = ca::issue(tmp.path(), &expired, false).unwrap().dir;
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("ferry ca issue --force"), "{err}");

    let future =
        IssueRequest::host("new").validity(Validity::between(now + DAY, now + 2 * DAY).unwrap());
    let dir = ca::issue(tmp.path(), &future, false).unwrap().dir;
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
}

#[test]
fn a_certificate_never_outlives_its_ca() {
    let ca = CertificateAuthority::generate("short", Validity::days(2).unwrap()).unwrap();
    let issued = ca
        .issue(&IssueRequest::host("hostA").validity(Validity::days(365).unwrap()))
        .unwrap();
    assert_eq!(issued.validity.not_after, ca.validity().not_after);
}

#[test]
fn bad_days_and_ca_names_are_refused() {
    let tmp = TempDir::new("days");
    assert!(matches!(
        ca::init_ca(tmp.path(), "fleet", 0),
        Err(CaError::BadDays(0))
    ));
    assert!(matches!(
        ca::init_ca(tmp.path(), "", 10),
        Err(CaError::BadCaName(_))
    ));
    assert!(!tmp.path().join("ca.key").exists());
}

#[test]
fn issue_refuses_a_ca_whose_key_is_open_or_not_its_own() {
    let tmp = TempDir::new("cakey");
    ca::init_ca(tmp.path(), "fleet", 10).unwrap();
    let key = tmp.path().join("ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false).unwrap_err();
    assert!(matches!(err, CaError::InsecureKey { .. }), "{err}");
    assert!(err.to_string().contains("chmod 600"), "{err}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    let other = TempDir::new("cakey-other");
    ca::init_ca(other.path(), "other", 10).unwrap();
    fs::write(&key, fs::read(other.path().join("ca.key")).unwrap()).unwrap();
    let err = ca::issue(tmp.path(), &IssueRequest::host("hostA"), false).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(!tmp.path().join("hostA").exists());
}
