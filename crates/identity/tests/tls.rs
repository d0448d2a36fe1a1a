//! Real TLS over real loopback TCP between identities made by Ferry's own
//! CA code: the good handshake, and each way a peer must be refused with a
//! message that says why.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{identity, identity_valid, new_ca, DAY};
use ferry_identity::tls::{accept_authorized, accept_timeout, connect_timeout};
use ferry_identity::{
    authorize, client_config, server_config, Allowed, ConfigError, HandshakeError, Identity,
    IssueRequest, IssuedCert, PeerIdentity, TlsStream, ALPN_MIGRATION,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS server on a loopback port: accepts connections one after the
/// other, echoes what an accepted client sends, and reports each outcome.
struct Server {
    addr: SocketAddr,
    outcomes: mpsc::Receiver<Result<PeerIdentity, HandshakeError>>,
}

impl Server {
    fn start(identity: &Identity) -> Server {
        Self::start_with_timeout(identity, TIMEOUT)
    }

    fn start_with_timeout(identity: &Identity, timeout: Duration) -> Server {
        Self::start_full(identity, timeout, None)
    }

    fn start_authorized(identity: &Identity, allowed: Allowed) -> Server {
        Self::start_full(identity, TIMEOUT, Some(allowed))
    }

    fn start_full(identity: &Identity, timeout: Duration, allowed: Option<Allowed>) -> Server {
        let config = server_config(identity, &[ALPN_MIGRATION]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, outcomes) = mpsc::channel();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let tcp = tcp.unwrap();
                let accepted = match &allowed {
                    Some(allowed) => accept_authorized(tcp, &config, allowed, timeout),
                    None => accept_timeout(tcp, &config, timeout),
                };
                let outcome = accepted.map(|(mut stream, peer)| {
                    assert_eq!(stream.peer(), &peer);
                    echo(&mut stream);
                    peer
                });
                if tx.send(outcome).is_err() {
                    return;
                }
            }
        });
        Server { addr, outcomes }
    }

    fn next(&self) -> Result<PeerIdentity, HandshakeError> {
        self.outcomes
            .recv_timeout(TIMEOUT * 2)
            .expect("the server reported no outcome")
    }
}

/// Echoes one message (up to the client's close) back.
fn echo(stream: &mut TlsStream) {
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).unwrap();
    stream.write_all(&buf[..n]).unwrap();
    stream.close().unwrap();
}

fn dial(
    server: &Server,
    config: &Arc<rustls::ClientConfig>,
    expected: &str,
) -> Result<TlsStream, HandshakeError> {
    let tcp = TcpStream::connect(server.addr).unwrap();
    connect_timeout(tcp, config, expected, TIMEOUT)
}

fn client(identity: &Identity) -> Arc<rustls::ClientConfig> {
    client_config(identity, &[ALPN_MIGRATION]).unwrap()
}

/// Sends a message and checks it comes back.
fn round_trip(stream: &mut TlsStream) {
    let message = b"pages 0..512 of region 0";
    stream.write_all(message).unwrap();
    stream.flush().unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back, message);
}

#[test]
fn mutual_tls_both_ways_echoes_data_and_names_both_peers() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_b = identity(&ca, IssueRequest::host("hostB"));

    for (server_id, client_id) in [(&host_b, &host_a), (&host_a, &host_b)] {
        let server = Server::start(server_id);
        let mut stream = dial(&server, &client(client_id), server_id.name()).unwrap();
        assert_eq!(stream.peer(), server_id.me());
        assert_eq!(stream.alpn_protocol(), Some(ALPN_MIGRATION.as_bytes()));
        assert_eq!(
            stream.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            stream.cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        round_trip(&mut stream);
        assert_eq!(server.next().unwrap(), *client_id.me());
    }
}

#[test]
fn an_operator_is_seen_as_an_operator_and_authorization_denies_by_default() {
    let ca = new_ca("test fleet");
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let alice = identity(&ca, IssueRequest::operator("alice"));
    let host_c = identity(&ca, IssueRequest::host("hostC"));
    let server = Server::start(&host_b);

    let mut stream = dial(&server, &client(&alice), "hostB").unwrap();
    round_trip(&mut stream);
    let peer = server.next().unwrap();
    assert_eq!(peer, PeerIdentity::operator("alice"));
    assert!(authorize(&peer, &Allowed::operators()).is_ok());
    let refused = authorize(&peer, &Allowed::hosts(["hostA"])).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "refused operator alice: this connection accepts only host hostA"
    );

    let mut stream = dial(&server, &client(&host_c), "hostB").unwrap();
    round_trip(&mut stream);
    let peer = server.next().unwrap();
    assert_eq!(peer, PeerIdentity::host("hostC"));
    let refused = authorize(&peer, &Allowed::hosts(["hostA"])).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "refused host hostC: this connection accepts only host hostA"
    );
    assert!(authorize(&peer, &Allowed::default()).is_err());
}

#[test]
fn a_server_that_authorizes_tells_a_refused_client_who_it_expected() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let host_c = identity(&ca, IssueRequest::host("hostC"));
    let alice = identity(&ca, IssueRequest::operator("alice"));
    let server = Server::start_authorized(&host_b, Allowed::hosts(["hostA"]));

    for (intruder, who) in [(&host_c, "host hostC"), (&alice, "operator alice")] {
        let err = dial(&server, &client(intruder), "hostB").unwrap_err();
        let expected = format!("refused {who}: this connection accepts only host hostA");
        match &err {
            HandshakeError::NotAuthorized { reason, .. } => assert_eq!(reason, &expected),
            other => panic!("expected NotAuthorized, got {other}"),
        }
        assert!(!err.is_retryable());
        let err = server.next().unwrap_err();
        assert!(matches!(err, HandshakeError::Unauthorized { .. }), "{err}");
        assert!(err.to_string().ends_with(&expected), "{err}");
    }

    // The allowed host gets through, and its data is not eaten by the
    // accept/refuse exchange.
    let mut stream = dial(&server, &client(&host_a), "hostB").unwrap();
    round_trip(&mut stream);
    assert_eq!(server.next().unwrap(), PeerIdentity::host("hostA"));
}

#[test]
fn an_operator_identity_cannot_serve() {
    let ca = new_ca("test fleet");
    let alice = identity(&ca, IssueRequest::operator("alice"));
    let err = server_config(&alice, &[]).unwrap_err();
    assert!(
        matches!(err, ConfigError::OperatorCannotServe { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("operator alice cannot serve"),
        "{err}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let ca = new_ca("test fleet");
    let other = new_ca("another fleet");
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    // Trusts our CA, so it accepts hostB, but its own certificate is the
    // other fleet's.
    let intruder = other.issue(&IssueRequest::host("hostA")).unwrap();
    let server = Server::start(&host_b);
    let config = client_trusting(&intruder, &host_b);

    let err = dial(&server, &config, "hostB").unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "UnknownCA"),
        "{err}"
    );
    assert!(err.to_string().contains("same fleet ca.crt"), "{err}");
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::UnknownCa { .. }), "{err}");
    assert!(
        err.to_string().contains("not signed by our fleet CA"),
        "{err}"
    );
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let ca = new_ca("test fleet");
    let other = new_ca("another fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let fake_b = identity(&other, IssueRequest::host("hostB"));
    let server = Server::start(&fake_b);

    let err = dial(&server, &client(&host_a), "hostB").unwrap_err();
    assert!(matches!(err, HandshakeError::UnknownCa { .. }), "{err}");
    let err = server.next().unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "UnknownCA"),
        "{err}"
    );
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let ca = new_ca("test fleet");
    let now = SystemTime::now();
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let expired_a = identity_valid(&ca, IssueRequest::host("hostA"), now - 10 * DAY, now - DAY);
    let server = Server::start(&host_b);

    let err = dial(&server, &client(&expired_a), "hostB").unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "CertificateExpired"),
        "{err}"
    );
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("has expired"), "{err}");
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let ca = new_ca("test fleet");
    let now = SystemTime::now();
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let expired_b = identity_valid(&ca, IssueRequest::host("hostB"), now - 10 * DAY, now - DAY);
    let server = Server::start(&expired_b);

    let err = dial(&server, &client(&host_a), "hostB").unwrap_err();
    assert!(matches!(err, HandshakeError::Expired { .. }), "{err}");
    assert!(server.next().is_err());
}

#[test]
fn a_server_certificate_not_valid_yet_is_refused() {
    let ca = new_ca("test fleet");
    let now = SystemTime::now();
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let future_b = identity_valid(&ca, IssueRequest::host("hostB"), now + DAY, now + 2 * DAY);
    let server = Server::start(&future_b);

    let err = dial(&server, &client(&host_a), "hostB").unwrap_err();
    assert!(matches!(err, HandshakeError::NotYetValid { .. }), "{err}");
    assert!(err.to_string().contains("clocks"), "{err}");
    assert!(server.next().is_err());
}

#[test]
fn a_server_that_is_another_host_is_refused() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_c = identity(&ca, IssueRequest::host("hostC"));
    let server = Server::start(&host_c);

    let err = dial(&server, &client(&host_a), "hostB").unwrap_err();
    match &err {
        HandshakeError::WrongHost {
            expected,
            presented,
            ..
        } => {
            assert_eq!(expected, "hostB");
            assert!(presented.contains("hostC"), "{err}");
        }
        other => panic!("expected WrongHost, got {other}"),
    }
    assert!(err.to_string().contains("is not host hostB"), "{err}");
    let err = server.next().unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "BadCertificate"),
        "{err}"
    );
}

#[test]
fn a_host_with_the_expected_name_as_an_extra_dns_name_is_still_not_that_host() {
    // hostC's certificate was issued with `--dns hostB`: the TLS name check
    // passes, the ferry:// URI says who it really is.
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_c = identity(&ca, IssueRequest::host("hostC").dns("hostB"));
    let server = Server::start(&host_c);

    let err = dial(&server, &client(&host_a), "hostB").unwrap_err();
    match &err {
        HandshakeError::WrongHost { presented, .. } => assert_eq!(presented, "host hostC"),
        other => panic!("expected WrongHost, got {other}"),
    }
    let err = server.next().unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "BadCertificate"),
        "{err}"
    );
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let ca = new_ca("test fleet");
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let server = Server::start(&host_b);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(host_b.ca_cert().clone()).unwrap();
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let err = dial(&server, &anonymous, "hostB").unwrap_err();
    assert!(
        matches!(&err, HandshakeError::RefusedByPeer { alert, .. } if alert == "CertificateRequired"),
        "{err}"
    );
    let err = server.next().unwrap_err();
    assert!(
        matches!(err, HandshakeError::NoClientCertificate { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("sent no client certificate"),
        "{err}"
    );
}

#[test]
fn plaintext_and_garbage_are_refused_and_the_server_keeps_accepting() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let server = Server::start_with_timeout(&host_b, Duration::from_millis(500));

    // An HTTP request line on the TLS port.
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: hostB\r\n\r\n")
        .unwrap();
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::NotTls { .. }), "{err}");
    assert!(err.to_string().contains("does not speak TLS"), "{err}");
    drop(tcp);

    // 100 KB of random bytes.
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let garbage: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // The server may hang up before reading it all.
    let _ = tcp.write_all(&garbage);
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::NotTls { .. }), "{err}");
    drop(tcp);

    // A TLS 1.2-only ClientHello (no supported_versions extension).
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2d, 0x01, 0x00, 0x00, 0x29, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0x42; 32]);
    hello.extend_from_slice(&[0x00, 0x00, 0x02, 0xc0, 0x2f, 0x01, 0x00]);
    tcp.write_all(&hello).unwrap();
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("cannot do TLS 1.3"), "{err}");
    drop(tcp);

    // A client that connects and says nothing.
    let silent = TcpStream::connect(server.addr).unwrap();
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    drop(silent);

    // A client that hangs up at once.
    drop(TcpStream::connect(server.addr).unwrap());
    let err = server.next().unwrap_err();
    assert!(matches!(err, HandshakeError::Closed { .. }), "{err}");

    // And the real client still gets through.
    let mut stream = dial(&server, &client(&host_a), "hostB").unwrap();
    round_trip(&mut stream);
    assert_eq!(server.next().unwrap(), PeerIdentity::host("hostA"));
}

#[test]
fn a_client_talking_to_a_plaintext_server_says_so() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let plaintext = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut buf = [0u8; 512];
        let _ = tcp.read(&mut buf).unwrap();
        tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let err = connect_timeout(tcp, &client(&host_a), "hostB", TIMEOUT).unwrap_err();
    assert!(matches!(err, HandshakeError::NotTls { .. }), "{err}");
    plaintext.join().unwrap();
}

#[test]
fn a_handshake_that_never_comes_times_out() {
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let started = std::time::Instant::now();
    let err =
        connect_timeout(tcp, &client(&host_a), "hostB", Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(listener);
}

/// A client configuration presenting `issued` but trusting the CA of
/// `trusted` (to test a server's refusal of a foreign client).
fn client_trusting(issued: &IssuedCert, trusted: &Identity) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.ca_cert().clone()).unwrap();
    let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap(),
    )
}

/// Not a pass/fail test: how fast one TLS stream moves bulk data over
/// loopback next to plain TCP on this machine. Run by hand:
/// `cargo test --release -p ferry-identity --test tls -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_of_one_stream_next_to_plain_tcp() {
    const TOTAL: usize = 256 << 20;
    const CHUNK: usize = 256 << 10;
    let ca = new_ca("test fleet");
    let host_a = identity(&ca, IssueRequest::host("hostA"));
    let host_b = identity(&ca, IssueRequest::host("hostB"));
    let server = server_config(&host_b, &[ALPN_MIGRATION]).unwrap();
    let client_cfg = client(&host_a);

    let sink = |mut r: Box<dyn Read + Send>| {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < TOTAL {
            let n = r.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
        }
    };
    let send = |w: &mut dyn Write| {
        let chunk = vec![0x5au8; CHUNK];
        let started = std::time::Instant::now();
        for _ in 0..TOTAL / CHUNK {
            w.write_all(&chunk).unwrap();
        }
        w.flush().unwrap();
        started
    };

    for tls in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let receiver = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let reader: Box<dyn Read + Send> = if tls {
                Box::new(accept_timeout(tcp, &server, TIMEOUT).unwrap().0)
            } else {
                Box::new(tcp)
            };
            sink(reader);
            std::time::Instant::now()
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let started = if tls {
            let mut stream = connect_timeout(tcp, &client_cfg, "hostB", TIMEOUT).unwrap();
            send(&mut stream)
        } else {
            let mut tcp = tcp;
            send(&mut tcp)
        };
        let done = receiver.join().unwrap();
        let secs = done.duration_since(started).as_secs_f64();
        println!(
            "{}: {:.1} Gbit/s",
            if tls { "TLS 1.3" } else { "plain TCP" },
            TOTAL as f64 * 8.0 / secs / 1e9
        );
    }
}
