//! Framing: every message on a migration stream is one length-capped,
//! checksummed frame, so a reader never trusts a byte it has not verified.
//!
//! Layout (little endian, 20-byte header, then the payload):
//!
//! ```text
//! offset size field
//!      0    2 magic          b"FY"
//!      2    2 kind           FrameKind as u16
//!      4    2 flags          bit 0: payload checked by the link (v12);
//!                            no other bit is defined: must be 0
//!      6    2 reserved       must be 0
//!      8    4 payload length <= the kind's cap
//!     12    4 payload crc32  (IEEE) of the payload bytes
//!     16    4 header crc32   (IEEE) of bytes 0..16
//!     20    … payload
//! ```
//!
//! A Pages frame on a TLS link may carry bit 0, [`FLAG_LINK_CHECKED`]: its
//! payload crc32 is then 0 and is neither computed nor verified, because
//! the link's AEAD has authenticated every byte of it already (the crc
//! costs each side about a tenth of a TLS pre-copy's CPU). A reader takes
//! the flag only from a link that says it authenticates, so a plaintext
//! peer can never turn the check off.
//!
//! The header has its own checksum so that a corrupt length or kind is
//! caught before the reader acts on it (allocates, or waits for bytes that
//! will never come); the payload checksum sits in the header because the
//! writer always has the whole payload in hand (see `pages.rs` for why that
//! holds for guest pages too).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use crate::error::ProtocolError;

pub const FRAME_MAGIC: [u8; 2] = *b"FY";
pub const HEADER_LEN: usize = 20;

/// Cap on control messages: they are small; 1 MiB leaves room for a large
/// CPUID table and feature list while bounding what a peer makes us hold.
pub const MAX_CONTROL_PAYLOAD: u32 = 1 << 20;
/// Cap on the state record (vCPU, VM-wide and device state), in the spirit
/// of Firecracker's 10 MB cap on snapshot state, with room for many vCPUs.
pub const MAX_STATE_PAYLOAD: u32 = 32 << 20;
/// Cap on a Pages frame: 8 MiB of page data plus its run table.
pub const MAX_PAGES_PAYLOAD: u32 = super::pages::MAX_PAGES_PAYLOAD as u32;

/// A Pages frame whose payload has no crc32: the link authenticates it.
pub const FLAG_LINK_CHECKED: u16 = 1;

/// Flag bits this version understands; a frame with any other bit set came
/// from a newer peer that skipped negotiation, or is corrupt.
pub const KNOWN_FLAGS: u16 = FLAG_LINK_CHECKED;

/// How a frame's payload is protected against corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadCheck {
    /// A crc32 in the header, verified by the reader.
    #[default]
    Crc32,
    /// The link authenticates every byte (TLS): no crc (protocol v12).
    ByLink,
}

impl PayloadCheck {
    /// What a link of this kind, at this negotiated version, may use.
    pub fn for_link(authenticated: bool, version: u16) -> Self {
        if authenticated && version >= super::version::LINK_CHECKED_PAGES_VERSION {
            Self::ByLink
        } else {
            Self::Crc32
        }
    }

    /// What a reader accepts from a link: a frame without its crc only
    /// from one that authenticates.
    pub fn accepted_on(authenticated: bool) -> Self {
        if authenticated {
            Self::ByLink
        } else {
            Self::Crc32
        }
    }
}

/// What a frame carries. The numbers are the wire encoding: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    Hello = 1,
    HelloAck = 2,
    Offer = 3,
    Accept = 4,
    Refuse = 5,
    Pages = 6,
    RoundEnd = 7,
    State = 8,
    StateLoaded = 9,
    Commit = 10,
    Committed = 11,
    Abort = 12,
    Resumed = 13,
    PostcopyPrepare = 14,
    Join = 15,
    PostcopyReady = 16,
    PostcopyBegin = 17,
    PageRequest = 18,
    PostcopyComplete = 19,
    Resume = 20,
    ResumeState = 21,
    StreamsOpen = 22,
    StreamJoin = 23,
    StreamsOpened = 24,
    StripedRound = 25,
    Prepare = 26,
    Decide = 27,
    BlackoutBegins = 28,
    Started = 29,
    Forwarded = 30,
    ForwardEnd = 31,
    Bind = 32,
    BindAck = 33,
}

impl FrameKind {
    pub const ALL: [FrameKind; 33] = [
        Self::Hello,
        Self::HelloAck,
        Self::Offer,
        Self::Accept,
        Self::Refuse,
        Self::Pages,
        Self::RoundEnd,
        Self::State,
        Self::StateLoaded,
        Self::Commit,
        Self::Committed,
        Self::Abort,
        Self::Resumed,
        Self::PostcopyPrepare,
        Self::Join,
        Self::PostcopyReady,
        Self::PostcopyBegin,
        Self::PageRequest,
        Self::PostcopyComplete,
        Self::Resume,
        Self::ResumeState,
        Self::StreamsOpen,
        Self::StreamJoin,
        Self::StreamsOpened,
        Self::StripedRound,
        Self::Prepare,
        Self::Decide,
        Self::BlackoutBegins,
        Self::Started,
        Self::Forwarded,
        Self::ForwardEnd,
        Self::Bind,
        Self::BindAck,
    ];

    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == value)
    }

    /// The largest payload a frame of this kind may claim.
    pub fn max_payload(self) -> u32 {
        match self {
            Self::Pages => MAX_PAGES_PAYLOAD,
            Self::State => MAX_STATE_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }

    /// Control frames carry a serde-encoded message; the two data kinds
    /// (Pages, State) carry raw bytes.
    pub fn is_control(self) -> bool {
        !matches!(self, Self::Pages | Self::State)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::HelloAck => "HelloAck",
            Self::Offer => "Offer",
            Self::Accept => "Accept",
            Self::Refuse => "Refuse",
            Self::Pages => "Pages",
            Self::RoundEnd => "RoundEnd",
            Self::State => "State",
            Self::StateLoaded => "StateLoaded",
            Self::Commit => "Commit",
            Self::Committed => "Committed",
            Self::Abort => "Abort",
            Self::Resumed => "Resumed",
            Self::PostcopyPrepare => "PostcopyPrepare",
            Self::Join => "Join",
            Self::PostcopyReady => "PostcopyReady",
            Self::PostcopyBegin => "PostcopyBegin",
            Self::PageRequest => "PageRequest",
            Self::PostcopyComplete => "PostcopyComplete",
            Self::Resume => "Resume",
            Self::ResumeState => "ResumeState",
            Self::StreamsOpen => "StreamsOpen",
            Self::StreamJoin => "StreamJoin",
            Self::StreamsOpened => "StreamsOpened",
            Self::StripedRound => "StripedRound",
            Self::Prepare => "Prepare",
            Self::Decide => "Decide",
            Self::BlackoutBegins => "BlackoutBegins",
            Self::Started => "Started",
            Self::Forwarded => "Forwarded",
            Self::ForwardEnd => "ForwardEnd",
            Self::Bind => "Bind",
            Self::BindAck => "BindAck",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A verified frame header: its kind is known, its length within the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub flags: u16,
    pub len: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&FRAME_MAGIC);
        b[2..4].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        // b[6..8] reserved, zero.
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_crc.to_le_bytes());
        let header_crc = crc32fast::hash(&b[0..16]);
        b[16..20].copy_from_slice(&header_crc.to_le_bytes());
        b
    }

    /// Checks a header in the order that gives the clearest error: a wrong
    /// peer first, then corruption, then what a sane header may not say.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[0..2] != FRAME_MAGIC {
            return Err(ProtocolError::BadMagic {
                found: [b[0], b[1]],
            });
        }
        if crc32fast::hash(&b[0..16]) != u32_at(16) {
            return Err(ProtocolError::HeaderChecksum);
        }
        let reserved = u16_at(6);
        if reserved != 0 {
            return Err(ProtocolError::ReservedNonZero(reserved));
        }
        let raw_kind = u16_at(2);
        let kind = FrameKind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
        let flags = u16_at(4);
        if flags & !KNOWN_FLAGS != 0 || (flags & FLAG_LINK_CHECKED != 0 && kind != FrameKind::Pages)
        {
            return Err(ProtocolError::UnknownFlags { kind, flags });
        }
        let len = u32_at(8);
        if len > kind.max_payload() {
            return Err(ProtocolError::Oversize {
                kind,
                len: len.into(),
                cap: kind.max_payload(),
            });
        }
        Ok(Self {
            kind,
            flags,
            len,
            payload_crc: u32_at(12),
        })
    }
}

/// Writes one frame whose payload is the concatenation of `parts`, with one
/// vectored write loop: no copy of the parts, and one syscall when the
/// socket takes it all.
pub fn write_frame_vectored(
    w: &mut impl Write,
    kind: FrameKind,
    parts: &[&[u8]],
) -> Result<(), ProtocolError> {
    write_frame_checked(w, kind, parts, PayloadCheck::Crc32)
}

/// Like [`write_frame_vectored`], with the payload protected as `check`
/// says (`ByLink` only for Pages, on a link that authenticates).
pub fn write_frame_checked(
    w: &mut impl Write,
    kind: FrameKind,
    parts: &[&[u8]],
    check: PayloadCheck,
) -> Result<(), ProtocolError> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let cap = kind.max_payload();
    if len > u64::from(cap) {
        return Err(ProtocolError::Oversize { kind, len, cap });
    }
    let (flags, payload_crc) = match check {
        PayloadCheck::ByLink if kind == FrameKind::Pages => (FLAG_LINK_CHECKED, 0),
        _ => {
            let mut hasher = crc32fast::Hasher::new();
            for part in parts {
                hasher.update(part);
            }
            (0, hasher.finalize())
        }
    };
    let header = FrameHeader {
        kind,
        flags,
        len: len as u32, // fits: checked against a u32 cap above
        payload_crc,
    }
    .encode();
    let mut slices = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(&header));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    write_all_vectored(w, &mut slices)?;
    Ok(())
}

pub fn write_frame(
    w: &mut impl Write,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    write_frame_vectored(w, kind, &[payload])
}

/// `Write::write_all_vectored` is unstable; this is the same loop.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns how much arrived,
/// so that callers can tell a clean close from a frame cut short.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads and verifies the next frame header. A stream that ends exactly at
/// a frame boundary is `PeerClosed`; anywhere else it is truncation.
pub fn read_header(r: &mut impl Read) -> Result<FrameHeader, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    match read_full(r, &mut b)? {
        0 => Err(ProtocolError::PeerClosed),
        HEADER_LEN => FrameHeader::decode(&b),
        read => Err(ProtocolError::TruncatedHeader { read }),
    }
}

/// Reads a whole payload into `buf` (reused across frames) and checks it.
/// The length was capped when the header was decoded, so the allocation is
/// bounded by the kind's cap.
pub fn read_payload(
    r: &mut impl Read,
    header: &FrameHeader,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    buf.clear();
    buf.resize(header.len as usize, 0);
    let mut payload = PayloadReader::new(r, header);
    payload.read_into(buf)?;
    payload.finish()
}

/// Reads one payload piece by piece (e.g. a run table, then page data
/// straight into guest memory) while counting and checksumming it.
pub(crate) struct PayloadReader<'r, R: Read> {
    r: &'r mut R,
    kind: FrameKind,
    expected_crc: u32,
    /// None when the link checked the payload (`FLAG_LINK_CHECKED`).
    hasher: Option<crc32fast::Hasher>,
    read: u64,
    len: u64,
}

impl<'r, R: Read> PayloadReader<'r, R> {
    /// Refuses a payload without its crc unless `accepted` is `ByLink`.
    pub(crate) fn checked(
        r: &'r mut R,
        header: &FrameHeader,
        accepted: PayloadCheck,
    ) -> Result<Self, ProtocolError> {
        if header.flags & FLAG_LINK_CHECKED != 0 && accepted != PayloadCheck::ByLink {
            return Err(ProtocolError::UncheckedOnPlainLink);
        }
        Ok(Self::new(r, header))
    }

    pub(crate) fn new(r: &'r mut R, header: &FrameHeader) -> Self {
        Self {
            r,
            kind: header.kind,
            expected_crc: header.payload_crc,
            hasher: (header.flags & FLAG_LINK_CHECKED == 0).then(crc32fast::Hasher::new),
            read: 0,
            len: header.len.into(),
        }
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.len - self.read
    }

    pub(crate) fn malformed(&self, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            reason: reason.into(),
        }
    }

    pub(crate) fn read_into(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        if buf.len() as u64 > self.remaining() {
            return Err(self.malformed("contents run past the payload length"));
        }
        let got = read_full(self.r, buf)?;
        if got < buf.len() {
            return Err(ProtocolError::TruncatedPayload {
                kind: self.kind,
                read: self.read + got as u64,
                expected: self.len,
            });
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(buf);
        }
        self.read += got as u64;
        Ok(())
    }

    /// Every byte must have been consumed and the checksum must match.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.remaining() != 0 {
            return Err(self.malformed(format!("{} unread trailing bytes", self.remaining())));
        }
        if self
            .hasher
            .is_some_and(|h| h.finalize() != self.expected_crc)
        {
            return Err(ProtocolError::PayloadChecksum { kind: self.kind });
        }
        Ok(())
    }
}

/// Sends the encoded state record as one State frame, without copying it.
pub fn write_state(w: &mut impl Write, state: &[u8]) -> Result<(), ProtocolError> {
    write_frame(w, FrameKind::State, state)
}

/// Reads the payload of a State frame whose header was just read.
pub fn read_state(
    r: &mut impl Read,
    header: &FrameHeader,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    if header.kind != FrameKind::State {
        return Err(ProtocolError::Unexpected {
            expected: "a State frame",
            got: header.kind,
        });
    }
    read_payload(r, header, buf)
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
