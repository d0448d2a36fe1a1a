//! Why a migration failed, and where the VM is as a result.

use crate::guest::GuestError;
use crate::protocol::FrameKind;
use crate::ProtocolError;

/// The source side's failure.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to the destination {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// Refused here, before anything moved: the request cannot be done.
    #[error("the migration cannot be done as asked: {0}")]
    NotPossible(String),
    #[error("securing the connection to the destination: {0}")]
    Transport(String),
    #[error("the destination aborted the migration: {0}")]
    PeerAborted(String),
    #[error("{stage}: {source}")]
    Protocol {
        stage: &'static str,
        source: ProtocolError,
    },
    #[error("{stage}: the VM failed: {source}")]
    Guest {
        stage: &'static str,
        source: GuestError,
    },
    #[error("{stage}: expected {expected}, the destination sent {got}")]
    Unexpected {
        stage: &'static str,
        expected: &'static str,
        got: FrameKind,
    },
    #[error("the destination acknowledged a state of {got_len} bytes (crc {got_crc:#010x}), not the {len} bytes (crc {crc:#010x}) sent")]
    StateMismatch {
        len: u64,
        crc: u32,
        got_len: u64,
        got_crc: u32,
    },
    #[error("post-copy's link failed ({link}) and the destination could not be reached again within {waited:?} (last try: {last}); the VM is paused here and on the destination, with pages only this host holds")]
    RecoveryFailed {
        link: String,
        last: String,
        waited: std::time::Duration,
    },
    #[error("page-data streams: {0}")]
    Streams(String),
    #[error("the downtime limit cannot be kept: {0}")]
    DowntimeLimit(String),
    #[error("cancelled by the operator")]
    Cancelled,
    #[error("the commit was sent but not acknowledged ({0}); the VM stays paused on the source until an operator confirms where it runs")]
    CommitUnacknowledged(String),
}

impl MigrateError {
    pub(crate) fn protocol(stage: &'static str) -> impl FnOnce(ProtocolError) -> Self {
        move |source| Self::Protocol { stage, source }
    }

    pub(crate) fn guest(stage: &'static str) -> impl FnOnce(GuestError) -> Self {
        move |source| Self::Guest { stage, source }
    }
}

/// The destination side's failure; the destination holds nothing after it.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{stage}: {source}")]
    Protocol {
        stage: &'static str,
        source: ProtocolError,
    },
    #[error("refused the incoming VM: {0}")]
    Refused(String),
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    #[error("{stage}: the incoming VM failed: {source}")]
    Guest {
        stage: &'static str,
        source: GuestError,
    },
    #[error("{stage}: the source sent {got} where {expected} belongs")]
    Unexpected {
        stage: &'static str,
        expected: &'static str,
        got: FrameKind,
    },
    #[error("round {round}: the source says it sent {said} pages, {got} arrived")]
    PageCount { round: u32, said: u64, got: u64 },
    #[error("post-copy: {0}")]
    Postcopy(String),
    #[error("page-data streams: {0}")]
    Streams(String),
    #[error("the downtime limit cannot be kept: {0}")]
    DowntimeLimit(String),
    #[error("the link broke after the state was acknowledged ({link}) and the source's decision never came: {why}")]
    NoDecision { link: String, why: String },
}

impl ReceiveError {
    pub(crate) fn protocol(stage: &'static str) -> impl FnOnce(ProtocolError) -> Self {
        move |source| Self::Protocol { stage, source }
    }
}

/// Every message in an error's chain, joined: what a human should read.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
