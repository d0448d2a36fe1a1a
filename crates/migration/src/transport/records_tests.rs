//! The record layer against itself and against rustls's own connection:
//! records sealed here open in rustls and the other way round, and a
//! flipped bit, a foreign record type or a post-handshake message is
//! refused.

use std::io::{IoSlice, Read, Write};

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

use super::*;

/// AES-256-GCM: rustls makes a test key of 32 bytes only.
fn suite() -> SupportedCipherSuite {
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
}

fn secrets(byte: u8) -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([byte; 32]),
        iv: Iv::from([byte; 12]),
    }
}

/// A sealer and the opener that reads what it seals.
fn pair(seq: u64) -> (Sealer, Opener) {
    let (sealer, _) = take_over(suite(), (seq, secrets(1)), (0, secrets(2))).unwrap();
    let (_, opener) = take_over(suite(), (0, secrets(2)), (seq, secrets(1))).unwrap();
    (sealer, opener)
}

/// Opens every record of `wire`; returns the data and whether a
/// close_notify came.
fn open_all(opener: &mut Opener, mut wire: Vec<u8>) -> Result<(Vec<u8>, bool), RecordError> {
    let (mut data, mut closed) = (Vec::new(), false);
    let mut at = 0;
    while at < wire.len() {
        let header: [u8; HEADER_LEN] = wire[at..at + HEADER_LEN].try_into().unwrap();
        let len = body_len(&header)?;
        let body = &mut wire[at + HEADER_LEN..at + HEADER_LEN + len];
        match opener.open(body)? {
            Opened::Data(r) => data.extend_from_slice(&body[r]),
            Opened::CloseNotify => closed = true,
        }
        at += HEADER_LEN + len;
    }
    Ok((data, closed))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn slices_become_full_records_and_open_again() {
    let (mut sealer, mut opener) = pair(5);
    let data = pattern(3 * MAX_PLAINTEXT + 100);
    let (a, b) = data.split_at(20);
    let (b, c) = b.split_at(MAX_PLAINTEXT + 7);
    let mut records = Vec::new();
    let taken = sealer
        .seal_data(
            &[
                IoSlice::new(a),
                IoSlice::new(&[]),
                IoSlice::new(b),
                IoSlice::new(c),
            ],
            usize::MAX,
            &mut records,
        )
        .unwrap();
    assert_eq!(taken, data.len());
    assert_eq!(records.len(), 4, "three full records and the rest");
    assert!(records[..3]
        .iter()
        .all(|r| r.len() == HEADER_LEN + MAX_PLAINTEXT + 1 + 16));
    let mut wire: Vec<u8> = records.concat();
    wire.extend(sealer.seal_close_notify().unwrap());
    let (got, closed) = open_all(&mut opener, wire).unwrap();
    assert!(got == data, "the data came back changed");
    assert!(closed);
}

#[test]
fn a_write_takes_no_more_than_its_limit() {
    let (mut sealer, mut opener) = pair(0);
    let data = pattern(100_000);
    let mut records = Vec::new();
    let taken = sealer
        .seal_data(&[IoSlice::new(&data)], 40_000, &mut records)
        .unwrap();
    assert_eq!(taken, 40_000);
    let (got, _) = open_all(&mut opener, records.concat()).unwrap();
    assert!(got == data[..40_000]);
}

#[test]
fn a_flipped_bit_a_replayed_record_and_foreign_headers_are_refused() {
    let (mut sealer, mut opener) = pair(0);
    let mut records = Vec::new();
    sealer
        .seal_data(&[IoSlice::new(&pattern(1000))], usize::MAX, &mut records)
        .unwrap();
    let mut flipped = records[0].clone();
    flipped[HEADER_LEN + 10] ^= 1;
    assert!(matches!(
        open_all(&mut opener, flipped),
        Err(RecordError::Decrypt)
    ));
    // The opener moved on a sequence number: the genuine record, now out of
    // order, fails too (as a replay would).
    assert!(matches!(
        open_all(&mut opener, records[0].clone()),
        Err(RecordError::Decrypt)
    ));
    assert!(matches!(
        body_len(&[0x16, 3, 3, 0, 10]),
        Err(RecordError::BadHeader { typ: 0x16, .. })
    ));
    assert!(matches!(
        body_len(&[0x17, 3, 1, 0, 10]),
        Err(RecordError::BadHeader { .. })
    ));
    assert!(matches!(
        body_len(&[0x17, 3, 3, 0xff, 0xff]),
        Err(RecordError::Oversize(0xffff))
    ));
}

#[test]
fn a_handshake_message_after_the_handshake_is_refused() {
    let (mut sealer, mut opener) = pair(0);
    let wire = sealer
        .seal(
            ContentType::Handshake,
            OutboundChunks::Single(&[24, 0, 0, 1, 0]),
        )
        .unwrap();
    assert!(matches!(
        open_all(&mut opener, wire),
        Err(RecordError::PostHandshake)
    ));
}

#[test]
fn a_sealer_stops_at_its_ciphers_limit() {
    let (mut sealer, _) = pair(0);
    sealer.limit = 2;
    let mut records = Vec::new();
    let data = pattern(MAX_PLAINTEXT * 3);
    assert!(matches!(
        sealer.seal_data(&[IoSlice::new(&data)], usize::MAX, &mut records),
        Err(RecordError::KeysExhausted(2))
    ));
}

/// rustls's own connections on both ends of an in-memory pipe, their
/// keys then handed over on one side, talk to the other side's rustls.
#[test]
fn records_match_what_rustls_sends_and_reads() {
    use ferry_identity::{CertificateAuthority, Identity, IssueRequest, Validity, ALPN_MIGRATION};
    let ca = CertificateAuthority::generate("test fleet", Validity::days(1).unwrap()).unwrap();
    let ids: Vec<Identity> = ["hostA", "hostB"]
        .iter()
        .map(|h| {
            let issued = ca.issue(&IssueRequest::host(*h)).unwrap();
            Identity::from_pem(&issued.ca_pem, &issued.cert_pem, &issued.key_pem).unwrap()
        })
        .collect();
    let client_config = ferry_identity::client_config(&ids[0], &[ALPN_MIGRATION]).unwrap();
    let server_config = ferry_identity::server_config(&ids[1], &[ALPN_MIGRATION]).unwrap();
    let mut client =
        rustls::ClientConnection::new(client_config, "hostB".to_string().try_into().unwrap())
            .unwrap();
    let mut server = rustls::ServerConnection::new(server_config).unwrap();
    let mut pipe = Vec::new();
    for _ in 0..10 {
        while client.wants_write() {
            client.write_tls(&mut pipe).unwrap();
        }
        server.read_tls(&mut pipe.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        pipe.clear();
        while server.wants_write() {
            server.write_tls(&mut pipe).unwrap();
        }
        client.read_tls(&mut pipe.as_slice()).unwrap();
        client.process_new_packets().unwrap();
        pipe.clear();
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let negotiated = client.negotiated_cipher_suite().unwrap();
    let secrets = client.dangerous_extract_secrets().unwrap();
    let (mut sealer, mut opener) = take_over(negotiated, secrets.tx, secrets.rx).unwrap();

    // Ours to rustls.
    let data = pattern(2 * MAX_PLAINTEXT + 3);
    let mut records = Vec::new();
    sealer
        .seal_data(&[IoSlice::new(&data)], usize::MAX, &mut records)
        .unwrap();
    let wire = records.concat();
    let mut rest = wire.as_slice();
    while !rest.is_empty() {
        // rustls takes at most a few KiB per call.
        server.read_tls(&mut rest).unwrap();
        server.process_new_packets().unwrap();
    }
    let mut got = vec![0u8; data.len()];
    server.reader().read_exact(&mut got).unwrap();
    assert!(got == data, "rustls read other bytes than were sealed");

    // rustls to ours, then its close_notify.
    server.writer().write_all(&data).unwrap();
    server.send_close_notify();
    let mut wire = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut wire).unwrap();
    }
    let (got, closed) = open_all(&mut opener, wire).unwrap();
    assert!(
        got == data,
        "the opener read other bytes than rustls sealed"
    );
    assert!(closed);
}
