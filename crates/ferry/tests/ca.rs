//! `ferry ca init` and `ferry ca issue` as a user runs them: the real
//! binary writes a CA and identities, and the identities it wrote load and
//! complete a mutual TLS handshake over loopback. Needs no KVM.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_identity::{
    accept, authorize, client_config, connect, server_config, Allowed, Identity, PeerIdentity,
    ALPN_MIGRATION,
};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferry-ca-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

fn ferry(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("running ferry");
    eprintln!(
        "ferry {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(out.status.success(), "ferry {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(!out.status.success(), "ferry {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir` with its bytes and mode.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            out.push((path.clone(), fs::read(&path).unwrap(), mode(&path)));
        }
    }
    out.sort();
    out
}

#[test]
fn ca_init_and_issue_make_identities_that_handshake() {
    let tmp = TempDir::new("flow");
    let ca = tmp.0.join("fleet-ca");
    let ca_s = ca.to_str().unwrap();

    let out = ok(&["ca", "init", ca_s, "--name", "Test fleet", "--days", "30"]);
    assert!(out.contains("made CA \"Test fleet\""), "{out}");
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca), 0o700);

    // A second init fails and changes nothing.
    let before = tree(&ca);
    let err = fails(&["ca", "init", ca_s]);
    assert!(err.contains("a CA already exists"), "{err}");
    assert_eq!(tree(&ca), before);

    let out = ok(&["ca", "issue", "--name", "hostA", "--ip", "127.0.0.1", ca_s]);
    assert!(out.contains("ferry://host/hostA"), "{out}");
    assert!(out.contains("IP 127.0.0.1"), "{out}");
    let json = ok(&[
        "ca",
        "issue",
        "--name",
        "hostB",
        "--ip",
        "127.0.0.2",
        "--dns",
        "hostb.lab",
        "--json",
        ca_s,
    ]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["uri"], "ferry://host/hostB");
    assert_eq!(json["role"], "host");
    assert_eq!(json["dns"], serde_json::json!(["hostB", "hostb.lab"]));
    assert_eq!(json["ips"], serde_json::json!(["127.0.0.2"]));
    assert_eq!(
        json["files"]["key"].as_str().unwrap(),
        ca.join("hostB/key.pem").to_str().unwrap()
    );
    ok(&["ca", "issue", "--name", "alice", "--operator", ca_s]);

    for name in ["hostA", "hostB", "alice"] {
        let dir = ca.join(name);
        assert_eq!(mode(&dir.join("key.pem")), 0o600, "{name}");
        assert_eq!(
            fs::read(dir.join("ca.crt")).unwrap(),
            fs::read(ca.join("ca.crt")).unwrap()
        );
        assert!(!dir.join("ca.key").exists());
    }

    // A bad name, an existing identity and addresses for an operator fail,
    // and change nothing.
    let before = tree(&ca);
    let err = fails(&["ca", "issue", "--name", "host_b", ca_s]);
    assert!(err.contains("not a valid name"), "{err}");
    let err = fails(&["ca", "issue", "--name", "../x", ca_s]);
    assert!(err.contains("not a valid name"), "{err}");
    let err = fails(&["ca", "issue", "--name", "hostA", ca_s]);
    assert!(err.contains("--force"), "{err}");
    let err = fails(&[
        "ca",
        "issue",
        "--name",
        "bob",
        "--operator",
        "--ip",
        "10.0.0.1",
        ca_s,
    ]);
    assert!(
        err.contains("operator certificate names no addresses"),
        "{err}"
    );
    let err = fails(&["ca", "issue", "--name", "hostD", "--ip", "not-an-ip", ca_s]);
    assert!(err.contains("not-an-ip"), "{err}");
    assert_eq!(tree(&ca), before);
    let err = fails(&[
        "ca",
        "issue",
        "--name",
        "hostA",
        tmp.0.join("nowhere").to_str().unwrap(),
    ]);
    assert!(err.contains("ferry ca init"), "{err}");

    // --force replaces hostA's identity with a new key.
    let old_key = fs::read(ca.join("hostA/key.pem")).unwrap();
    ok(&[
        "ca",
        "issue",
        "--name",
        "hostA",
        "--ip",
        "127.0.0.1",
        "--force",
        ca_s,
    ]);
    assert_ne!(fs::read(ca.join("hostA/key.pem")).unwrap(), old_key);
    assert_eq!(mode(&ca.join("hostA/key.pem")), 0o600);

    // The identities load and talk: hostA (client) to hostB (server), and
    // the operator to hostB.
    let host_a = Identity::load(&ca.join("hostA")).unwrap();
    let host_b = Identity::load(&ca.join("hostB")).unwrap();
    let alice = Identity::load(&ca.join("alice")).unwrap();
    let server = server_config(&host_b, &[ALPN_MIGRATION]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().unwrap();
            let (mut stream, peer) = accept(tcp, &server).unwrap();
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).unwrap();
            stream.write_all(&buf[..n]).unwrap();
            stream.close().unwrap();
            peers.push(peer);
        }
        peers
    });
    for client in [&host_a, &alice] {
        let config = client_config(client, &[ALPN_MIGRATION]).unwrap();
        let mut stream = connect(TcpStream::connect(addr).unwrap(), &config, "hostB").unwrap();
        assert_eq!(stream.peer(), &PeerIdentity::host("hostB"));
        stream.write_all(b"hello hostB").unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello hostB");
    }
    let peers = serving.join().unwrap();
    assert_eq!(
        peers,
        [PeerIdentity::host("hostA"), PeerIdentity::operator("alice")]
    );
    assert!(authorize(&peers[0], &Allowed::hosts(["hostA"])).is_ok());
    assert!(authorize(&peers[1], &Allowed::hosts(["hostA"])).is_err());

    // A key made readable by others is refused, with the fix in the message.
    let key = ca.join("hostB/key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&ca.join("hostB")).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
}
