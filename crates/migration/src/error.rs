//! The one error type of the wire protocol, which says whether a failed
//! migration may be retried on a fresh connection or must not be.

use std::io;

use crate::protocol::FrameKind;

/// What went wrong reading or writing the migration stream.
///
/// Link-level failures ([`is_retryable`](Self::is_retryable)) say nothing
/// about the peer's intent: a new connection may succeed. Everything else
/// means the peer (or our own caller) broke the protocol, and retrying the
/// same thing would fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer closed the connection")]
    PeerClosed,
    #[error("stream ended inside a frame header ({read} of 20 bytes)")]
    TruncatedHeader { read: usize },
    #[error("stream ended inside a {kind} payload ({read} of {expected} bytes)")]
    TruncatedPayload {
        kind: FrameKind,
        read: u64,
        expected: u64,
    },
    #[error("transport i/o failed")]
    Io(#[from] io::Error),

    #[error("bad frame magic {found:02x?}: the peer does not speak Ferry's migration protocol")]
    BadMagic { found: [u8; 2] },
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    #[error("{kind} payload checksum mismatch")]
    PayloadChecksum { kind: FrameKind },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("{kind} frame carries unknown flags {flags:#06x}")]
    UnknownFlags { kind: FrameKind, flags: u16 },
    #[error("a Pages frame without its checksum arrived on a link that does not authenticate its bytes (plain TCP): a wrong or broken peer")]
    UncheckedOnPlainLink,
    #[error("frame header reserved field is {0:#06x}, not zero")]
    ReservedNonZero(u16),
    #[error("{kind} payload of {len} bytes is over its cap of {cap} bytes")]
    Oversize { kind: FrameKind, len: u64, cap: u32 },
    #[error("malformed {kind} payload: {reason}")]
    Malformed { kind: FrameKind, reason: String },
    #[error("expected {expected}, got a {got} frame")]
    Unexpected {
        expected: &'static str,
        got: FrameKind,
    },
    #[error("pages at {gpa:#x} (+{len:#x} bytes) are outside the memory the destination reserved")]
    PageRangeRejected { gpa: u64, len: u64 },
    #[error("refusing to send an invalid page batch: {0}")]
    InvalidBatch(String),
}

impl ProtocolError {
    /// True for failures of the link itself (closed, cut short, i/o error,
    /// timeout): the migration failed but a fresh attempt may succeed.
    /// False for corruption and protocol violations, which are fatal.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::PeerClosed
                | Self::TruncatedHeader { .. }
                | Self::TruncatedPayload { .. }
                | Self::Io(_)
        )
    }

    /// True when the stream ended early, cleanly or mid-frame.
    pub fn is_peer_closed(&self) -> bool {
        matches!(
            self,
            Self::PeerClosed | Self::TruncatedHeader { .. } | Self::TruncatedPayload { .. }
        )
    }
}
