//! The data plane between two real `ferryd` (real KVM, real TLS with
//! certificates made by `ferry ca`): mutual TLS 1.3 on every migration
//! stream by default, each connection bound to the prepared migration by a
//! one-time token; wrong and replayed tokens and a fleet host that did not
//! prepare the migration are refused while the destination waits on for
//! the right source; plaintext only when both agents allow it. Every
//! migration verifies the guest (heartbeats continue, no page error).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{agent, host, migrate_verified, peer_addr, Fleet};
use common::{ferry_bin, kvm_or_skip, TempDir};
use ferry_identity::Identity;
use ferry_migration::protocol::{recv_message, write_message, Hello, HelloAck, Message, Role};
use ferry_migration::transport::{DialError, Dialer, SessionToken};
use serde_json::{json, Value};

#[test]
fn mutual_tls_by_default_and_plaintext_only_when_both_allow() {
    if !kvm_or_skip("mutual_tls_by_default_and_plaintext_only_when_both_allow") {
        return;
    }
    let fleet = Fleet::new("dp");
    // a and c allow a plaintext data plane, b does not.
    let a = agent("dp-a", &fleet, "2G", true);
    let b = agent("dp-b", &fleet, "2G", false);
    let c = agent("dp-c", &fleet, "2G", true);
    a.create_vm("vm1", "256M", "dirty:32:50");
    a.heartbeat("vm1");

    // One side allows plaintext, the other not: mutual TLS.
    let done = migrate_verified(&a, &b, "vm1");
    let says = done["transport"].as_str().unwrap();
    assert!(
        says.starts_with(&format!("mutual TLS (TLS 1.3, peer {})", host(&b))),
        "{done}"
    );
    let engine = done["report"]["transport"].as_str().unwrap();
    assert!(
        engine.starts_with("tls1.3 TLS13_")
            && engine.contains(&format!("peer host {}", host(&b)))
            && engine.contains("bound by a one-time session token"),
        "{engine}"
    );
    // Neither side allows plaintext: mutual TLS again.
    let done = migrate_verified(&b, &c, "vm1");
    assert!(
        done["transport"]
            .as_str()
            .unwrap()
            .starts_with(&format!("mutual TLS (TLS 1.3, peer {})", host(&c))),
        "{done}"
    );
    // Both allow it: plaintext, and the job says so.
    let done = migrate_verified(&c, &a, "vm1");
    assert!(
        done["transport"].as_str().unwrap().starts_with("plaintext"),
        "{done}"
    );
    assert!(
        done["report"]["transport"]
            .as_str()
            .unwrap()
            .starts_with("plaintext"),
        "{done}"
    );
    // No token file outlives its migration.
    for agent in [&a, &b, &c] {
        let jobs = agent.dir.path("state").join("jobs");
        let left: Vec<_> = std::fs::read_dir(&jobs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "token"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "token files left: {left:?}");
    }
}

/// A VMM the test runs itself (as host A would), killed on drop.
struct OwnVm(Child);

impl Drop for OwnVm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asks `to`'s agent, as the holder of `client`'s certificate, to prepare
/// for VM `vm`; the answer's JSON.
fn prepare(
    rt: &tokio::runtime::Runtime,
    client: &Arc<rustls::ClientConfig>,
    to: &common::Agent,
    vm: &str,
) -> Value {
    let offer = json!({"job": format!("job-{vm}"), "vm": vm,
        "definition": {"mem_bytes": 256u64 << 20, "workload": "dirty:32:50"},
        "policy": {}, "plaintext_data_plane": false});
    let r = rt
        .block_on(ferry_agent::peer::call(
            client,
            &host(to),
            &peer_addr(to),
            "POST",
            "/v1/peer/migrations",
            Some(&offer),
        ))
        .unwrap();
    assert!(r.is_success(), "prepare: {} {}", r.status, r.reason());
    serde_json::from_slice(&r.body).unwrap()
}

fn dial(dialer: &Dialer, address: &str) -> Result<(), DialError> {
    dialer
        .dial(address.parse().unwrap(), Duration::from_secs(5))
        .map(drop)
}

#[test]
fn wrong_or_replayed_tokens_and_other_hosts_are_refused_and_the_source_still_gets_in() {
    if !kvm_or_skip(
        "wrong_or_replayed_tokens_and_other_hosts_are_refused_and_the_source_still_gets_in",
    ) {
        return;
    }
    let fleet = Fleet::new("dpt");
    let b = agent("dpt-b", &fleet, "2G", false);
    // Host A prepares and migrates by hand (its own VMM); host C is
    // another host of the same fleet.
    let a_dir = fleet.issue("test-dpt-a");
    let c_dir = fleet.issue("test-dpt-c");
    let a_id = Identity::load(&a_dir).unwrap();
    let c_id = Identity::load(&c_dir).unwrap();
    let a_http = ferry_identity::client_config(&a_id, &["http/1.1"]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // A first prepare, withdrawn: its token is spent.
    let first = prepare(&rt, &a_http, &b, "vm7");
    assert_eq!(first["plaintext"], false, "{first}");
    let first_id = first["id"].as_str().unwrap();
    let r = rt
        .block_on(ferry_agent::peer::call(
            &a_http,
            &host(&b),
            &peer_addr(&b),
            "DELETE",
            &format!("/v1/peer/migrations/{first_id}"),
            None,
        ))
        .unwrap();
    assert!(r.is_success(), "{} {}", r.status, r.reason());
    let old = SessionToken::from_hex(first["token"].as_str().unwrap()).unwrap();

    let prepared = prepare(&rt, &a_http, &b, "vm7");
    let address = prepared["address"].as_str().unwrap().to_owned();
    let address = address.replace("0.0.0.0", "127.0.0.1");
    let token = SessionToken::from_hex(prepared["token"].as_str().unwrap()).unwrap();
    assert_eq!(prepared["token"].as_str().unwrap().len(), 64);
    assert_ne!(token, old);
    let as_a = Dialer::tls(&a_id, &host(&b)).unwrap();

    // A wrong token: refused, with the reason.
    let wrong = SessionToken::generate().unwrap();
    let err = dial(&as_a.clone().with_token(wrong), &address).unwrap_err();
    assert!(
        err.to_string()
            .contains("refused this connection's session token"),
        "{err}"
    );
    // The token of the withdrawn migration (a replay): refused.
    let err = dial(&as_a.clone().with_token(old), &address).unwrap_err();
    assert!(err.to_string().contains("session token"), "{err}");
    // Host C, of the same fleet, with the right token: it did not prepare
    // this migration, so its certificate is refused.
    let as_c = Dialer::tls(&c_id, &host(&b))
        .unwrap()
        .with_token(token.clone());
    assert!(dial(&as_c, &address).is_err());
    // A source that opens with Hello (protocol v7, no token): told why.
    {
        let link = as_a
            .dial(address.parse().unwrap(), Duration::from_secs(5))
            .unwrap();
        write_message(&mut &link, &Message::Hello(Hello::new(Role::Source))).unwrap();
        link.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match recv_message(&mut &link, &mut Vec::new()).unwrap() {
            Message::HelloAck(HelloAck::Refused { reason }) => {
                assert!(reason.contains("session token"), "{reason}")
            }
            other => panic!("a v7 source got {other:?}"),
        }
    }
    // Plaintext garbage on the TLS port.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&address).unwrap();
        let _ = s.write_all(&[0x5a; 4096]);
    }
    // The receiver still waits for its source.
    let incoming = rt
        .block_on(ferry_agent::peer::call(
            &a_http,
            &host(&b),
            &peer_addr(&b),
            "GET",
            &format!("/v1/peer/migrations/{}", prepared["id"].as_str().unwrap()),
            None,
        ))
        .unwrap();
    let incoming: Value = serde_json::from_slice(&incoming.body).unwrap();
    assert_eq!(incoming["phase"], "ready", "{incoming}");

    // The real source: a VMM on "host A" migrating with the right token.
    let tmp = TempDir::new("dpt-src");
    let socket = tmp.path("vm.sock");
    let log = std::fs::File::create(tmp.path("vm.log")).unwrap();
    let vm = OwnVm(
        Command::new(ferry_bin())
            .args(["run", "--mem", "256M", "--workload", "dirty:32:50", "--api"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the source VMM never opened its API"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let token_file = tmp.path("token");
    token.write_file(&token_file).unwrap();
    let out = Command::new(ferry_bin())
        .arg("migrate")
        .arg(&socket)
        .args(["--to", &address, "--mode", "precopy", "--tls"])
        .arg(&a_dir)
        .args(["--peer-name", &host(&b), "--token-file"])
        .arg(&token_file)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["transport"]
            .as_str()
            .unwrap()
            .contains("bound by a one-time session token"),
        "{report}"
    );
    drop(vm);
    // It runs on B, verified.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.get("/v1/vms/vm7").status != 200 {
        assert!(Instant::now() < deadline, "B never adopted vm7");
        std::thread::sleep(Duration::from_millis(50));
    }
    let hb = b.heartbeat("vm7");
    let later = b.heartbeat_after(
        "vm7",
        hb["seq"].as_u64().unwrap() + 2,
        Duration::from_secs(20),
    );
    assert_eq!(later["err"], 0, "{later}");
    assert_eq!(later["sequence_breaks"], 0, "{later}");
    // B's receiver logged each refusal.
    let console = std::fs::read_to_string(b.dir.path("state").join("vms/vm7/console.log"))
        .unwrap_or_default();
    let refusals = console.matches("still waiting for the source").count();
    assert!(refusals >= 5, "{refusals} refusals logged:\n{console}");
}

#[test]
fn a_bad_token_file_is_refused_before_anything_moves() {
    let tmp = TempDir::new("dp-badtoken");
    let path = tmp.path("token");
    std::fs::write(&path, "not a token\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(ferry_bin())
        .args([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--token-file",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token-file") && err.contains("64 hex digits"),
        "{err}"
    );
}
