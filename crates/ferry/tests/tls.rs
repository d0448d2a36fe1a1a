//! Migrations over mutual TLS 1.3 with identities `ferry ca` made, and
//! every way a wrong peer is refused: the VM keeps running verified on the
//! source, and a destination that met a bad connection keeps waiting for
//! its real source. Real KVM, real processes, real sockets.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::migrations::{
    assert_committed, finish_migrate, log_rounds, source_handed_over, stop_destination,
};
use common::{
    kvm_or_skip, migration_destination, migration_source, start_migrate, verify_arrival,
    verify_still_running, FerryProc, TempDir,
};
use serde_json::Value;

/// `ferry ARGS` to its end; panics unless it succeeds.
fn ferry_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("running ferry");
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in DIR/NAME and host identities for `hosts` in DIR/NAME/HOST.
fn fleet(dir: &TempDir, name: &str, hosts: &[&str]) -> String {
    let ca = dir.path(name);
    ferry_ok(&["ca", "init", &ca]);
    for host in hosts {
        ferry_ok(&["ca", "issue", "--name", host, "--ip", "127.0.0.1", &ca]);
    }
    ca
}

fn identity(ca: &str, host: &str) -> String {
    Path::new(ca).join(host).display().to_string()
}

/// A TLS destination (identity `host` of `ca`, allowing `allow`), with an
/// API socket and a JSON report.
fn tls_destination(dir: &TempDir, ca: &str, host: &str, allow: &str) -> (FerryProc, u16) {
    let socket = dir.path("destination.sock");
    let id = identity(ca, host);
    migration_destination(
        "destination",
        &[
            "--tls",
            &id,
            "--allow-source",
            allow,
            "--api",
            &socket,
            "--duration",
            "300s",
            "--json",
        ],
    )
}

/// Waits for a `ferry migrate` that must fail with the VM running on the
/// source; returns its reason line.
fn refused(mig: &mut FerryProc) -> String {
    let status = mig.wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "ferry migrate must fail\n{}",
        mig.transcript()
    );
    let line = mig
        .err
        .iter()
        .find_map(|l| l.strip_prefix("ferry: migration failed: "))
        .unwrap_or_else(|| panic!("no `migration failed` line\n{}", mig.transcript()))
        .to_owned();
    assert!(
        line.ends_with("the VM is running on the source"),
        "the VM must be running on the source: {line}"
    );
    line
}

/// The line containing `words` the destination logged: one read already
/// (a heartbeat read since may have come after it on the other stream),
/// or the next such line.
fn destination_says(dst: &mut FerryProc, words: &str) -> String {
    if let Some(seen) = dst.err.iter().chain(&dst.out).find(|l| l.contains(words)) {
        return seen.clone();
    }
    dst.wait_line(Duration::from_secs(30), words, |_, text| {
        text.contains(words).then(|| text.to_owned())
    })
}

/// One migration over mTLS, verified; returns the report.
fn tls_migration(test: &str, workload: &str, extra: &[&str]) -> Value {
    let dir = TempDir::new(test);
    let ca = fleet(&dir, "ca", &["hostA", "hostB"]);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "2", workload);
    let (mut dst, port) = tls_destination(&dir, &ca, "hostB", "hostA");
    src.next_heartbeat(Duration::from_secs(10));
    let id = identity(&ca, "hostA");
    let mut args = vec!["--tls", &id, "--peer-name", "hostB", "--json"];
    args.extend_from_slice(extra);
    let mut mig = start_migrate("migrate", &socket, port, &args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(120));
    assert_committed(status, &report, &mig);
    log_rounds(test, &report);
    let transport = report["transport"].as_str().unwrap_or_default();
    assert!(
        transport.starts_with("tls1.3 TLS13_") && transport.ends_with("peer host hostB"),
        "the report must name the TLS transport and the peer: {transport:?}"
    );
    // Heartbeats first: the destination's console (stdout) and its log
    // (stderr) are read apart, and a line awaited on one must not skip
    // heartbeats on the other.
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(60));
    destination_says(&mut dst, "tls1.3 TLS13_");
    stop_destination(&mut dst);
    report
}

#[test]
fn a_migration_over_mutual_tls_arrives_verified() {
    let test = "a_migration_over_mutual_tls_arrives_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let report = tls_migration(
        test,
        "dirty:256:100",
        &["--mode", "precopy", "--streams", "1"],
    );
    assert_eq!(report["mode"], "precopy");
}

#[test]
fn a_migration_over_mutual_tls_with_two_streams_arrives_verified() {
    let test = "a_migration_over_mutual_tls_with_two_streams_arrives_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let report = tls_migration(
        test,
        "dirty:256:100",
        &["--mode", "precopy", "--streams", "2"],
    );
    assert_eq!(report["streams"], 2, "{report:#}");
}

#[test]
fn a_postcopy_over_mutual_tls_arrives_verified() {
    let test = "a_postcopy_over_mutual_tls_arrives_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let report = tls_migration(test, "dirty:256:100", &["--mode", "postcopy"]);
    assert!(report["postcopy"].is_object(), "{report:#}");
}

#[test]
fn wrong_peers_are_refused_and_the_destination_keeps_waiting() {
    let test = "wrong_peers_are_refused_and_the_destination_keeps_waiting";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let ca = fleet(&dir, "ca", &["hostA", "hostB", "hostD"]);
    let other_ca = fleet(&dir, "other-ca", &["hostA"]);
    let (mut src, socket) = migration_source(&dir, "source", "512M", "2", "dirty:64:100");
    let (mut dst, port) = tls_destination(&dir, &ca, "hostB", "hostA");
    src.next_heartbeat(Duration::from_secs(10));

    // 100 KB of random bytes on the TLS port.
    let mut noise = vec![0u8; 100 << 10];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut garbage = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = garbage.write_all(&noise);
    drop(garbage);
    let said = destination_says(&mut dst, "still waiting for the source");
    eprintln!("{test}: random bytes: {said}");

    let attempt = |name: &str, args: &[&str]| {
        let mut mig = start_migrate(name, &socket, port, args);
        refused(&mut mig)
    };

    // A source whose identity another fleet's CA signed.
    let foreign = identity(&other_ca, "hostA");
    let why = attempt("unknown-ca", &["--tls", &foreign, "--peer-name", "hostB"]);
    eprintln!("{test}: unknown CA: {why}");
    assert!(why.contains("not signed by our fleet CA"), "{why}");

    // The source meant to reach hostC; hostB answers.
    let id_a = identity(&ca, "hostA");
    let why = attempt("wrong-host", &["--tls", &id_a, "--peer-name", "hostC"]);
    eprintln!("{test}: wrong host: {why}");
    assert!(
        why.contains("is not host hostC") && why.contains("hostB"),
        "{why}"
    );

    // A host of the fleet that the destination does not allow.
    let id_d = identity(&ca, "hostD");
    let why = attempt("not-allowed", &["--tls", &id_d, "--peer-name", "hostB"]);
    eprintln!("{test}: not allowed: {why}");
    assert!(
        why.contains("does not allow us") && why.contains("hostD"),
        "{why}"
    );
    let said = destination_says(&mut dst, "refused host hostD");
    eprintln!("{test}: destination: {said}");

    // A plaintext source against the TLS destination.
    let why = attempt("plaintext", &["--insecure-plaintext"]);
    eprintln!("{test}: plaintext source: {why}");
    let said = destination_says(&mut dst, "does not speak TLS");
    eprintln!("{test}: destination: {said}");

    // The VM never stopped running, every page checked.
    verify_still_running(&mut src, Duration::from_secs(60));

    // And the real source still gets through, without waiting behind a
    // client that connected first and then says nothing (its handshake
    // would hold out for 10 s).
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut mig = start_migrate(
        "migrate",
        &socket,
        port,
        &["--tls", &id_a, "--peer-name", "hostB", "--json"],
    );
    // The engine's first progress line comes once the connection is
    // secured, well inside the 10 s a silent client's handshake may take.
    mig.wait_line(
        Duration::from_secs(8),
        "a connection taken past the silent client",
        |_, text| text.contains("setup 0").then_some(()),
    );
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(120));
    assert_committed(status, &report, &mig);
    drop(silent);
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(60));
    stop_destination(&mut dst);
}

#[test]
fn plaintext_must_be_asked_for_on_both_sides() {
    let dir = TempDir::new("plaintext_must_be_asked_for");
    let socket = dir.path("no-vm.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["migrate", &socket, "--to", "127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to migrate in the clear") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["receive", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to receive in the clear") && err.contains("--insecure-plaintext"),
        "{err}"
    );
}

#[test]
fn a_plaintext_destination_survives_random_bytes_and_receives_its_source() {
    let test = "a_plaintext_destination_survives_random_bytes";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (mut src, socket) = migration_source(&dir, "source", "512M", "2", "dirty:64:100");
    let dst_socket = dir.path("destination.sock");
    let (mut dst, port) = migration_destination(
        "destination",
        &["--api", &dst_socket, "--duration", "300s", "--json"],
    );
    src.next_heartbeat(Duration::from_secs(10));
    let noise: Vec<u8> = (0..100u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut garbage = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = garbage.write_all(&noise);
    drop(garbage);
    let said = destination_says(&mut dst, "still waiting for the source");
    eprintln!("{test}: {said}");
    let mut mig = start_migrate("migrate", &socket, port, &["--json"]);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(120));
    assert_committed(status, &report, &mig);
    assert_eq!(
        report["transport"], "plaintext (insecure, asked on both sides)",
        "{report:#}"
    );
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(60));
    stop_destination(&mut dst);
}

/// Writes a session token file (0600) of 64 hex digits made of `byte`.
fn token_file(dir: &TempDir, name: &str, byte: u8) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.path(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    writeln!(f, "{}", format!("{byte:02x}").repeat(32)).unwrap();
    path
}

#[test]
fn token_bound_destination_takes_only_its_source() {
    let test = "token_bound_destination_takes_only_its_source";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new(test);
    let ca = fleet(&dir, "ca", &["hostA", "hostB"]);
    let (mut src, socket) = migration_source(&dir, "source", "1G", "2", "dirty:256:100");
    let right = token_file(&dir, "right.token", 0x3c);
    let wrong = token_file(&dir, "wrong.token", 0xc3);
    let api = dir.path("destination.sock");
    let id_b = identity(&ca, "hostB");
    let (mut dst, port) = migration_destination(
        "destination",
        &[
            "--tls",
            &id_b,
            "--allow-source",
            "hostA",
            "--token-file",
            &right,
            "--api",
            &api,
            "--duration",
            "300s",
            "--json",
        ],
    );
    src.next_heartbeat(Duration::from_secs(10));
    let id_a = identity(&ca, "hostA");
    let attempt = |name: &str, args: &[&str]| {
        let mut mig = start_migrate(name, &socket, port, args);
        refused(&mut mig)
    };
    let tls = ["--tls", id_a.as_str(), "--peer-name", "hostB"];

    // Another migration's token.
    let mut args = tls.to_vec();
    args.extend(["--token-file", wrong.as_str()]);
    let why = attempt("wrong-token", &args);
    eprintln!("{test}: wrong token: {why}");
    assert!(
        why.contains("refused this connection's session token"),
        "{why}"
    );
    destination_says(&mut dst, "not this migration's");

    // No token at all (as a v7 source would come).
    let why = attempt("no-token", &tls);
    eprintln!("{test}: no token: {why}");
    assert!(why.contains("session token"), "{why}");

    verify_still_running(&mut src, Duration::from_secs(60));

    // The right token, on the main connection and two extra streams.
    let mut args = tls.to_vec();
    args.extend(["--token-file", right.as_str(), "--streams", "2", "--json"]);
    let mut mig = start_migrate("migrate", &socket, port, &args);
    let (status, report) = finish_migrate(&mut mig, Duration::from_secs(120));
    assert_committed(status, &report, &mig);
    let transport = report["transport"].as_str().unwrap_or_default();
    assert!(
        transport.starts_with("tls1.3 TLS13_")
            && transport.ends_with("peer host hostB, bound by a one-time session token"),
        "{transport:?}"
    );
    let last = source_handed_over(&mut src, port);
    verify_arrival(&mut dst, &last, Duration::from_secs(60));
    stop_destination(&mut dst);
}
