//! The TLS 1.3 record layer of a migration link after the handshake.
//!
//! rustls shakes hands, authenticates the peer and agrees the traffic
//! keys; then the link takes the keys (`dangerous_extract_secrets`) and
//! seals and opens its records here, with the negotiated suite's own rustls
//! record encrypter and decrypter (nonce, additional data, inner content
//! type and padding are rustls's code, not ours). What the link gains over
//! rustls's buffered connection: each direction owns its keys, so the two
//! never share a lock; a record is sealed once, straight from the caller's
//! slices, and sent from where it was sealed; and a received record is
//! opened in place in the buffer the socket filled, where rustls copies
//! every byte twice more on the way in (into its deframer and into its
//! plaintext queue). The bytes on the wire are exactly what rustls sends.
//!
//! What this layer does not do: key updates. Neither end of a Ferry link
//! asks for one, and rustls sends one only when a connection nears its
//! cipher's confidentiality limit (2^24 records for AES-GCM: 256 GiB one
//! way on one connection). A sealer refuses to go past that limit, and a
//! post-handshake message from the peer (a key update or a ticket) ends
//! the link with an error that says so, rather than being misread.

use std::io::IoSlice;
use std::ops::Range;

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};

/// A record's header: type, legacy version, length.
pub(super) const HEADER_LEN: usize = 5;
/// Plaintext per record, the TLS maximum.
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
/// The longest record body a TLS 1.3 peer may send (RFC 8446, 5.2).
pub(super) const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// The longest record, header included.
pub(super) const MAX_RECORD: usize = HEADER_LEN + MAX_BODY;

/// Alert description of close_notify.
const CLOSE_NOTIFY: u8 = 0;
/// Alert level "warning", which close_notify carries.
const WARNING: u8 = 1;

/// Why a record could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error("the negotiated cipher suite {0:?} is not a TLS 1.3 suite")]
    NotTls13(rustls::CipherSuite),
    #[error("rustls handed over keys of an AEAD this link does not know")]
    UnknownAead,
    #[error("this connection has sent the {0} records its cipher allows under one key; Ferry does not update TLS keys: reconnect")]
    KeysExhausted(u64),
    #[error("the peer's record sequence numbers are exhausted")]
    PeerSequenceExhausted,
    #[error("a record of type {typ:#04x}, version {version:#06x} where TLS 1.3 sends only application data records (0x17, 0x0303): not a TLS peer, or a corrupt stream")]
    BadHeader { typ: u8, version: u16 },
    #[error("a record of {0} bytes, over TLS 1.3's {MAX_BODY}")]
    Oversize(usize),
    #[error("a record failed its authentication check (corrupt or forged data)")]
    Decrypt,
    #[error("the peer sent TLS alert {0} and closed the connection")]
    Alert(u8),
    #[error("the peer sent a TLS handshake message (a key update or a session ticket) after the handshake, which Ferry links do not take")]
    PostHandshake,
    #[error("a record with inner content type {0:#04x} after the handshake")]
    UnexpectedType(u8),
    #[error("sealing a record failed: {0}")]
    Seal(rustls::Error),
}

impl From<RecordError> for std::io::Error {
    fn from(e: RecordError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TLS: {e}"))
    }
}

/// Seals outgoing records under one traffic key.
pub(super) struct Sealer {
    encrypter: Box<dyn MessageEncrypter>,
    seq: u64,
    limit: u64,
}

/// Opens incoming records under one traffic key.
pub(super) struct Opener {
    decrypter: Box<dyn MessageDecrypter>,
    seq: u64,
}

/// What an opened record held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Opened {
    /// Application data, at this range of the body given to `open`.
    Data(Range<usize>),
    /// The peer's close_notify: the end of its data.
    CloseNotify,
}

/// A sealer for `tx` and an opener for `rx`, the secrets rustls handed
/// over, under `suite`.
pub(super) fn take_over(
    suite: SupportedCipherSuite,
    tx: (u64, ConnectionTrafficSecrets),
    rx: (u64, ConnectionTrafficSecrets),
) -> Result<(Sealer, Opener), RecordError> {
    let tls13 = match suite {
        SupportedCipherSuite::Tls13(tls13) => tls13,
        // Only when another crate turns rustls's TLS 1.2 on.
        #[allow(unreachable_patterns)]
        _ => return Err(RecordError::NotTls13(suite.suite())),
    };
    let aead = tls13.aead_alg;
    let (tx_seq, tx_secrets) = tx;
    let (tx_key, tx_iv) = key_and_iv(tx_secrets)?;
    let (rx_seq, rx_secrets) = rx;
    let (rx_key, rx_iv) = key_and_iv(rx_secrets)?;
    Ok((
        Sealer {
            encrypter: aead.encrypter(tx_key, tx_iv),
            seq: tx_seq,
            limit: tls13.common.confidentiality_limit,
        },
        Opener {
            decrypter: aead.decrypter(rx_key, rx_iv),
            seq: rx_seq,
        },
    ))
}

fn key_and_iv(secrets: ConnectionTrafficSecrets) -> Result<(AeadKey, Iv), RecordError> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        // The enum is non_exhaustive: an AEAD a later rustls adds.
        _ => Err(RecordError::UnknownAead),
    }
}

impl Sealer {
    /// Seals up to `max` bytes of `bufs`, in order, as application data
    /// records (whole wire records, header included) appended to `records`;
    /// returns how many bytes it took.
    pub(super) fn seal_data(
        &mut self,
        bufs: &[IoSlice<'_>],
        max: usize,
        records: &mut Vec<Vec<u8>>,
    ) -> Result<usize, RecordError> {
        let chunks: Vec<&[u8]> = bufs
            .iter()
            .map(|b| &**b)
            .filter(|b| !b.is_empty())
            .collect();
        let total = chunks.iter().map(|c| c.len()).sum::<usize>().min(max);
        let mut start = 0;
        while start < total {
            let end = total.min(start + MAX_PLAINTEXT);
            let payload = match chunks.as_slice() {
                [one] => OutboundChunks::Single(&one[start..end]),
                _ => OutboundChunks::Multiple {
                    chunks: &chunks,
                    start,
                    end,
                },
            };
            records.push(self.seal(ContentType::ApplicationData, payload)?);
            start = end;
        }
        Ok(total)
    }

    /// The close_notify alert, sealed.
    pub(super) fn seal_close_notify(&mut self) -> Result<Vec<u8>, RecordError> {
        let alert = [WARNING, CLOSE_NOTIFY];
        self.seal(ContentType::Alert, OutboundChunks::Single(&alert))
    }

    fn seal(
        &mut self,
        typ: ContentType,
        payload: OutboundChunks<'_>,
    ) -> Result<Vec<u8>, RecordError> {
        if self.seq >= self.limit {
            return Err(RecordError::KeysExhausted(self.limit));
        }
        let message = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload,
        };
        let sealed = self
            .encrypter
            .encrypt(message, self.seq)
            .map_err(RecordError::Seal)?;
        self.seq += 1;
        Ok(sealed.encode())
    }
}

/// The body length a record header announces, once the header is checked.
pub(super) fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    let version = u16::from_be_bytes([header[1], header[2]]);
    if header[0] != u8::from(ContentType::ApplicationData) || version != 0x0303 {
        return Err(RecordError::BadHeader {
            typ: header[0],
            version,
        });
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_BODY {
        return Err(RecordError::Oversize(len));
    }
    Ok(len)
}

impl Opener {
    /// Opens one record whose checked header announced `body.len()` bytes,
    /// in place: the plaintext ends up inside `body`.
    pub(super) fn open(&mut self, body: &mut [u8]) -> Result<Opened, RecordError> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or(RecordError::PeerSequenceExhausted)?;
        let base = body.as_ptr() as usize;
        let message =
            InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, body);
        let plain = self
            .decrypter
            .decrypt(message, seq)
            .map_err(|_| RecordError::Decrypt)?;
        match plain.typ {
            ContentType::ApplicationData => {
                // The plaintext is a sub-slice of `body`: say where.
                let start = plain.payload.as_ptr() as usize - base;
                Ok(Opened::Data(start..start + plain.payload.len()))
            }
            ContentType::Alert => match plain.payload {
                [_, CLOSE_NOTIFY] => Ok(Opened::CloseNotify),
                [_, description] => Err(RecordError::Alert(*description)),
                _ => Err(RecordError::UnexpectedType(u8::from(ContentType::Alert))),
            },
            ContentType::Handshake => Err(RecordError::PostHandshake),
            other => Err(RecordError::UnexpectedType(u8::from(other))),
        }
    }
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
