//! The TLS link over loopback: both directions at once from two threads
//! on each end, readiness without blocking, and refusals that leave the
//! listener taking the next client.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::time::{Duration, Instant};

use ferry_identity::{CertificateAuthority, Identity, IssueRequest, Validity};

use super::{
    Acceptor, Dialer, Link, Listener, Ready, SessionToken, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES,
};

fn identities(hosts: &[&str]) -> Vec<Identity> {
    let ca = CertificateAuthority::generate("test fleet", Validity::days(1).unwrap()).unwrap();
    hosts
        .iter()
        .map(|h| {
            let issued = ca
                .issue(&IssueRequest::host(*h).ip("127.0.0.1".parse().unwrap()))
                .unwrap();
            Identity::from_pem(&issued.ca_pem, &issued.cert_pem, &issued.key_pem).unwrap()
        })
        .collect()
}

/// A TLS listener as hostB allowing hostA, and a dialer as `client` to hostB.
fn pair(client: usize, ids: &[Identity]) -> (Listener, Dialer) {
    let listener = Listener::new(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Acceptor::tls(&ids[1], ["hostA"]).unwrap(),
    );
    (listener, Dialer::tls(&ids[client], "hostB").unwrap())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

#[test]
fn both_directions_at_once_from_two_threads() {
    let ids = identities(&["hostA", "hostB"]);
    let (listener, dialer) = pair(0, &ids);
    let addr = listener.local_addr().unwrap();
    let len = 8 << 20;
    let server = std::thread::spawn(move || {
        let (link, _) = listener.accept().unwrap();
        assert_eq!(link.peer_identity().unwrap().to_string(), "host hostA");
        let writer = link.try_clone().unwrap();
        let sent = std::thread::spawn(move || (&writer).write_all(&pattern(1, len)).unwrap());
        let mut got = vec![0u8; len];
        (&link).read_exact(&mut got).unwrap();
        sent.join().unwrap();
        assert!(got == pattern(2, len), "the server read corrupt data");
    });
    let link = dialer.dial(addr, Duration::from_secs(5)).unwrap();
    assert!(
        link.describe().starts_with("tls1.3 TLS13_"),
        "{}",
        link.describe()
    );
    assert!(
        link.describe().ends_with("peer host hostB"),
        "{}",
        link.describe()
    );
    let writer = link.try_clone().unwrap();
    let sent = std::thread::spawn(move || (&writer).write_all(&pattern(2, len)).unwrap());
    let mut got = vec![0u8; len];
    (&link).read_exact(&mut got).unwrap();
    sent.join().unwrap();
    assert!(got == pattern(1, len), "the client read corrupt data");
    server.join().unwrap();
}

#[test]
fn readiness_without_blocking() {
    let ids = identities(&["hostA", "hostB"]);
    let (listener, dialer) = pair(0, &ids);
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || listener.accept().unwrap().0);
    let client = dialer.dial(addr, Duration::from_secs(5)).unwrap();
    let server = server.join().unwrap();
    assert_eq!(client.ready_now().unwrap(), Ready::Nothing);
    (&server).write_all(b"abort!").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.ready_now().unwrap() == Ready::Nothing {
        assert!(
            std::time::Instant::now() < deadline,
            "the data never showed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(client.wait_readable(Duration::ZERO).unwrap());
    let mut got = [0u8; 6];
    (&client).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abort!");
    server.shutdown(Shutdown::Write).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.ready_now().unwrap() != Ready::Closed {
        assert!(
            std::time::Instant::now() < deadline,
            "the close never showed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!((&client).read(&mut got).unwrap(), 0);
}

#[test]
fn a_refused_client_leaves_the_listener_taking_the_next() {
    let ids = identities(&["hostA", "hostB", "hostD"]);
    let (listener, _) = pair(0, &ids);
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (link, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        (&link).read_exact(&mut byte).unwrap();
        // Handshakes end in any order: the plaintext client's may end
        // after the good one passed.
        let mut refusals = listener.take_refusals();
        let deadline = Instant::now() + Duration::from_secs(5);
        while refusals.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            refusals.extend(listener.take_refusals());
        }
        (byte[0], refusals)
    });
    let stranger = Dialer::tls(&ids[2], "hostB").unwrap();
    let err = stranger.dial(addr, Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("does not allow us"), "{err}");
    let plain = Dialer::plaintext()
        .dial(addr, Duration::from_secs(5))
        .unwrap();
    (&plain).write_all(&[0u8; 64]).unwrap();
    drop(plain);
    let good = Dialer::tls(&ids[0], "hostB").unwrap();
    let link: Link = good.dial(addr, Duration::from_secs(5)).unwrap();
    (&link).write_all(&[7]).unwrap();
    let (byte, refusals) = server.join().unwrap();
    assert_eq!(byte, 7);
    assert_eq!(refusals.len(), 2, "{refusals:?}");
}

/// Connects `count` clients that then say nothing.
fn silent_clients(addr: std::net::SocketAddr, count: usize) -> Vec<std::net::TcpStream> {
    (0..count)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect()
}

/// The real client's link is taken while `silent` connections, made
/// first, are still in their handshakes; it must not wait for them.
fn taken_past_silent_clients(listener: Listener, dialer: Dialer, silent: usize) {
    let addr = listener.local_addr().unwrap();
    let _silent = silent_clients(addr, silent);
    let started = Instant::now();
    let server = std::thread::spawn(move || {
        let (link, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        (&link).read_exact(&mut byte).unwrap();
        byte[0]
    });
    let link = dialer.dial(addr, Duration::from_secs(5)).unwrap();
    (&link).write_all(&[9]).unwrap();
    assert_eq!(server.join().unwrap(), 9);
    let waited = started.elapsed();
    assert!(
        waited < HANDSHAKE_TIMEOUT / 2,
        "the real client waited {waited:?} behind {silent} silent ones"
    );
}

#[test]
fn a_silent_tls_client_holds_nobody_up() {
    let ids = identities(&["hostA", "hostB"]);
    let (listener, dialer) = pair(0, &ids);
    taken_past_silent_clients(listener, dialer, 3);
}

#[test]
fn a_silent_client_holds_nobody_up_on_a_token_listener() {
    let token = SessionToken::generate().unwrap();
    let listener = Listener::new(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Acceptor::plaintext().with_token(token.clone()),
    );
    taken_past_silent_clients(listener, Dialer::plaintext().with_token(token), 2);
}

#[test]
fn a_flood_of_silent_clients_cuts_the_oldest_short_and_takes_the_real_one() {
    let ids = identities(&["hostA", "hostB"]);
    let (listener, dialer) = pair(0, &ids);
    let flood = MAX_HANDSHAKES + 4;
    taken_past_silent_clients(listener.try_clone().unwrap(), dialer, flood);
    // The silent ones beyond the limit were cut short, each a refusal.
    let mut refusals = listener.take_refusals();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals.len() < flood - MAX_HANDSHAKES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        refusals.extend(listener.take_refusals());
    }
    assert!(
        (flood - MAX_HANDSHAKES..=flood).contains(&refusals.len()),
        "the handshakes cut short are refusals: {refusals:?}"
    );
}
