//! Talking with the destination outside the rounds: the handshake, its
//! Abort between rounds, its reasons, its report after the commit.

use super::*;

/// Hello, then the Offer; returns the protocol version agreed on.
pub(super) fn handshake<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut Link,
    run: &mut Run<'_>,
) -> Result<u16, MigrateError> {
    let mut scratch = Vec::new();
    let stage = "handshake";
    let hello = Instant::now();
    write_message(stream, &Message::Hello(Hello::new(Role::Source)))
        .map_err(MigrateError::protocol(stage))?;
    let answer = recv_message(stream, &mut scratch).map_err(|e| plaintext_hint(stream, e));
    run.round_trip = hello.elapsed();
    let version = match answer? {
        Message::HelloAck(HelloAck::Accepted { version }) => version,
        Message::HelloAck(HelloAck::Refused { reason }) => {
            return Err(MigrateError::Refused(reason))
        }
        Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
        other => {
            return Err(MigrateError::Unexpected {
                stage,
                expected: "HelloAck",
                got: other.kind(),
            })
        }
    };
    let offer = guest
        .describe()
        .map_err(MigrateError::guest("describing the VM"))?;
    run.report.mem_bytes = offer.mem_bytes;
    run.report.vcpus = offer.vcpus;
    run.ram_ranges = offer.migrated_ranges();
    run.copies_disks = offer.copies_disks;
    if offer.copies_disks && version < STORAGE_COPY_VERSION {
        return Err(MigrateError::Refused(format!(
            "the destination speaks protocol v{version}, which cannot receive a copy of the VM's disk (v{STORAGE_COPY_VERSION} and later); upgrade it, or put the disk on storage both hosts share"
        )));
    }
    if !offer.disks.is_empty() && version < STORAGE_VERSION {
        return Err(MigrateError::Refused(format!(
            "the destination speaks protocol v{version}, which cannot take a VM with a disk (v{STORAGE_VERSION} and later); upgrade it"
        )));
    }
    let stage = "offering the VM";
    write_message(stream, &Message::Offer(offer)).map_err(MigrateError::protocol(stage))?;
    match recv_message(stream, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::Accept(_) => Ok(version),
        Message::Refuse(r) => Err(MigrateError::Refused(r.reason)),
        Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "Accept or Refuse",
            got: other.kind(),
        }),
    }
}

/// A plaintext Hello that a TLS destination refused ends in a closed
/// connection or a TLS alert where the HelloAck belongs: say so.
fn plaintext_hint(stream: &Link, e: crate::ProtocolError) -> MigrateError {
    use crate::ProtocolError as P;
    let looks_refused = matches!(
        e,
        P::PeerClosed | P::TruncatedHeader { .. } | P::BadMagic { .. }
    ) || matches!(&e, P::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset);
    if stream.is_tls() || !looks_refused {
        return MigrateError::protocol("handshake")(e);
    }
    MigrateError::Transport(format!(
        "the destination did not answer our plaintext Hello ({e}): it may require TLS; give --tls DIR --peer-name HOST, or start it with --insecure-plaintext"
    ))
}

/// A destination that gave up mid-round says why in an Abort frame; look
/// for one without blocking, between rounds.
pub(super) fn poll_abort(stream: &mut Link, scratch: &mut Vec<u8>) -> Result<(), MigrateError> {
    let stage = "checking on the destination";
    let io = |e: std::io::Error| MigrateError::Protocol {
        stage,
        source: e.into(),
    };
    match stream.ready_now() {
        Ok(crate::transport::Ready::Closed) => Err(MigrateError::Protocol {
            stage,
            source: crate::ProtocolError::PeerClosed,
        }),
        Ok(crate::transport::Ready::Data) => {
            let header = read_header(stream).map_err(MigrateError::protocol(stage))?;
            match read_message(stream, &header, scratch).map_err(MigrateError::protocol(stage))? {
                Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
                other => Err(MigrateError::Unexpected {
                    stage,
                    expected: "nothing (or Abort)",
                    got: other.kind(),
                }),
            }
        }
        Ok(crate::transport::Ready::Nothing) => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// A write that failed because the destination hung up may have a reason
/// waiting in the stream: an Abort it sent before closing. Prefer that.
pub(super) fn peer_reason(stream: &mut Link, error: MigrateError) -> MigrateError {
    let link_failed =
        matches!(&error, MigrateError::Protocol { source, .. } if source.is_retryable());
    if !link_failed {
        return error;
    }
    if stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return error;
    }
    let mut scratch = Vec::new();
    // Skip what the destination sent before its Abort (nothing, normally).
    for _ in 0..4 {
        match recv_message(stream, &mut scratch) {
            Ok(Message::Abort(a)) => return MigrateError::PeerAborted(a.reason),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    error
}

/// After the commit: the destination's word on its share of the blackout
/// (v5) and on what the guest saw.
pub(super) fn wait_guest_report(
    stream: &mut Link,
    wait: Duration,
) -> (GuestSeen, Option<crate::protocol::Started>) {
    let mut started = None;
    if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
        return (GuestSeen::default(), started);
    }
    let mut scratch = Vec::new();
    // Started, then Resumed; anything else ends the wait.
    for _ in 0..2 {
        match recv_message(stream, &mut scratch) {
            Ok(Message::Started(s)) => started = Some(s),
            Ok(Message::Resumed(r)) => {
                let seen = GuestSeen {
                    stall_ms: r.guest_stall_us.map(|us| us as f64 / 1e3),
                    first_seq: r.first_seq,
                };
                return (seen, started);
            }
            _ => break,
        }
    }
    (GuestSeen::default(), started)
}
