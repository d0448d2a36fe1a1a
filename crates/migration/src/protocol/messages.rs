//! The control messages of a migration, as serde types; each travels as the
//! postcard encoding of its struct in a frame of its own kind.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::frame::{read_header, read_payload, write_frame, FrameHeader, FrameKind};
use super::pages::PAGE_SIZE;
use super::version::{negotiate, VersionRange};
use crate::error::ProtocolError;

/// Opens every Hello, so that a peer that merely happens to frame like us
/// (or a test talking to the wrong port) is told apart at once.
pub const HELLO_MAGIC: [u8; 8] = *b"FERRYMIG";

/// Which end of a migration a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Owns the running VM and sends it.
    Source,
    /// Reserves memory, receives, and resumes the VM after the commit.
    Destination,
}

/// The source's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub versions: VersionRange,
    pub role: Role,
}

impl Hello {
    pub fn new(role: Role) -> Self {
        Self {
            magic: HELLO_MAGIC,
            versions: VersionRange::SUPPORTED,
            role,
        }
    }

    /// The answer a peer that plays `our_role` with `ours` gives.
    pub fn answer(&self, ours: VersionRange, our_role: Role) -> HelloAck {
        if self.magic != HELLO_MAGIC {
            return HelloAck::Refused {
                reason: format!("bad hello magic {:02x?}", self.magic),
            };
        }
        if self.role == our_role {
            return HelloAck::Refused {
                reason: format!("both sides claim the {:?} role", our_role),
            };
        }
        match negotiate(ours, self.versions) {
            Ok(version) => HelloAck::Accepted { version },
            Err(e) => HelloAck::Refused {
                reason: e.to_string(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloAck {
    Accepted { version: u16 },
    Refused { reason: String },
}

/// A range of guest RAM, guest-physical start and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub gpa: u64,
    pub len: u64,
}

/// What the source asks the destination to host: enough to check
/// compatibility and reserve memory before a single page moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Sorted, non-overlapping, page aligned; their lengths sum to mem_bytes.
    pub ram_ranges: Vec<RamRange>,
    pub tsc_khz: u32,
    /// The guest's CPUID entries in the VMM's own encoding; the protocol
    /// only carries them.
    pub cpuid: Vec<u8>,
    /// Named capabilities the VM relies on (devices, KVM features); the
    /// destination refuses any it cannot offer.
    pub features: Vec<String>,
    /// The VM's disks, which the destination must provide before a page
    /// moves (v9; an offer without disks travels in the older form, which
    /// every version reads: see `offer_wire`).
    pub disks: Vec<DiskOffer>,
    /// The source copies its disks' contents during this migration (local
    /// disks, v10): the destination makes a new image for each, and the
    /// blocks arrive as pages of the disk's range (see
    /// [`Offer::copied_disk_ranges`]), round by round with the memory.
    pub copies_disks: bool,
}

/// Where a copied disk's blocks travel in the migration's page address
/// space: byte `o` of disk `i` is the page data at
/// `DISK_COPY_BASE + i * DISK_COPY_STRIDE + o`. Far above any guest RAM
/// (x86-64 guest-physical addresses stop at 2^52), so a disk page can never
/// be mistaken for memory; the rounds, the dirty sets, the streams and the
/// blackout treat them alike, and the destination writes them into the
/// image instead of RAM.
pub const DISK_COPY_BASE: u64 = 1 << 56;
/// Room for each copied disk in that space: 16 TiB.
pub const DISK_COPY_STRIDE: u64 = 1 << 44;

/// A disk of the offered VM. On shared storage the destination opens the
/// same image (by this path or its own), of exactly this size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskOffer {
    /// The image's path on the source's host.
    pub path: String,
    pub bytes: u64,
    pub readonly: bool,
}

/// An Offer that cannot describe a real VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOffer {
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("RAM range {gpa:#x}+{len:#x} is empty, unaligned or wraps the address space")]
    BadRange { gpa: u64, len: u64 },
    #[error("RAM ranges at {0:#x} and {1:#x} overlap or are out of order")]
    Unordered(u64, u64),
    #[error("RAM ranges add up to {ranges} bytes, the offer says {mem_bytes}")]
    SizeMismatch { ranges: u64, mem_bytes: u64 },
    #[error("a copied disk of {bytes} bytes is not whole 4 KiB pages, or is empty or over 16 TiB")]
    BadCopiedDisk { bytes: u64 },
}

impl Offer {
    /// Checks that the offer is self-consistent; compatibility with this
    /// host is the destination's own decision.
    pub fn validate(&self) -> Result<(), InvalidOffer> {
        if self.vcpus == 0 {
            return Err(InvalidOffer::NoVcpus);
        }
        let page = PAGE_SIZE as u64;
        let mut total: u64 = 0;
        let mut prev_end: Option<(u64, u64)> = None;
        for r in &self.ram_ranges {
            let bad = InvalidOffer::BadRange {
                gpa: r.gpa,
                len: r.len,
            };
            let end = r.gpa.checked_add(r.len).ok_or(bad.clone())?;
            if r.len == 0 || r.gpa % page != 0 || r.len % page != 0 {
                return Err(bad);
            }
            if let Some((prev_gpa, prev_end)) = prev_end {
                if r.gpa < prev_end {
                    return Err(InvalidOffer::Unordered(prev_gpa, r.gpa));
                }
            }
            prev_end = Some((r.gpa, end));
            total = total.saturating_add(r.len);
        }
        if total != self.mem_bytes {
            return Err(InvalidOffer::SizeMismatch {
                ranges: total,
                mem_bytes: self.mem_bytes,
            });
        }
        if self.copies_disks {
            if let Some(d) = self
                .disks
                .iter()
                .find(|d| d.bytes == 0 || d.bytes % page != 0 || d.bytes > DISK_COPY_STRIDE)
            {
                return Err(InvalidOffer::BadCopiedDisk { bytes: d.bytes });
            }
        }
        Ok(())
    }

    /// The page ranges a copied disk's blocks travel in, one per disk in
    /// the offer's order; empty unless the source copies its disks.
    pub fn copied_disk_ranges(&self) -> Vec<RamRange> {
        if !self.copies_disks {
            return Vec::new();
        }
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| RamRange {
                gpa: DISK_COPY_BASE + i as u64 * DISK_COPY_STRIDE,
                len: d.bytes,
            })
            .collect()
    }

    /// Every range whose pages this migration moves: the RAM, then the
    /// copied disks.
    pub fn migrated_ranges(&self) -> Vec<RamRange> {
        let mut all = self.ram_ranges.clone();
        all.extend(self.copied_disk_ranges());
        all
    }

    /// True if `len` bytes at `gpa` lie inside one of the RAM ranges: what a
    /// destination's page sink checks before it writes.
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.ram_ranges
            .iter()
            .any(|r| r.gpa <= gpa && end <= r.gpa.saturating_add(r.len))
    }
}

/// The destination checked the offer and reserved its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    pub reserved_bytes: u64,
}

/// The destination will not host this VM; the source keeps running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub reason: String,
}

/// Closes a round of Pages frames; `pages` counts data and zero pages sent
/// in the round, so the destination can check it missed none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

/// The destination loaded the state record (echoed by length and crc32 so
/// the acknowledgment cannot be mistaken for one of another record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLoaded {
    pub state_len: u64,
    pub state_crc: u32,
}

/// The source gives the VM up: from here on the destination owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit;

/// The destination took ownership and resumes the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed;

/// Either side gives up; before the commit, the VM stays on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub reason: String,
}

/// After `Committed`, once the guest has run on the destination: what it
/// reported about the switchover (its own measured stall), for the
/// source's report. Optional: a source that never gets it still succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub guest_stall_us: Option<u64>,
    pub first_seq: Option<u64>,
}

/// The source is about to open the fault channel, a second connection
/// that carries only page requests and the pages that answer them, so a
/// faulting vCPU never waits behind the background push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyPrepare {
    pub session: u64,
}

/// The first frame on the fault channel: which migration it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub session: u64,
}

/// The destination accepted the fault channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyReady;

/// Sent while the source is paused, before the state: the pages the
/// destination does not hold (or holds stale), one bit per page over the
/// offer's RAM ranges in order, 64 pages per word. Every other page the
/// destination holds is current, or was never written (reads as zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyBegin {
    pub pages: u64,
    pub words: Vec<u64>,
}

/// Destination to source, on the fault channel: a vCPU waits on these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub gpa: u64,
    pub pages: u32,
}

/// Every page is here; the source may let its copy go. Carries what the
/// destination measured, for the source's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyComplete {
    pub pages: u64,
    pub requested_pages: u64,
    pub faults: u64,
    /// Remote fault latency: fault read to page placed, microseconds.
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// From the VM's start here to the last page placed.
    pub last_page_us: u64,
}

/// The first message on a new main connection after a post-copy link
/// failed (after Hello): the source is back for this migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub session: u64,
}

/// The destination's answer to Resume: the pages it holds, as in
/// PostcopyBegin; the source sends the rest again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    pub pages: u64,
    pub words: Vec<u64>,
}

/// Source to destination, on the main connection (v3): the source opens
/// `count` more connections for page data, each starting with a
/// StreamJoin, so that a large round can be sent on several cores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamsOpen {
    pub session: u64,
    pub count: u16,
}

/// The first frame on a page-data connection: its migration and its place
/// among the streams (0-based), which decides the stripes it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamJoin {
    pub session: u64,
    pub index: u16,
}

/// The destination's answer to StreamsOpen: how many streams it took.
/// Zero means it cannot take any (it has no listener) and every round
/// stays on the main connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamsOpened {
    pub count: u16,
}

/// On the main connection: this round's pages come on the page-data
/// streams, each stream carrying the stripes its index owns and ending
/// with its own RoundEnd; the main connection's RoundEnd follows, with the
/// round's total, once every stream has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripedRound {
    pub round: u32,
}

/// Source to destination, just before the State frame (v4): if the link
/// breaks after the state is acknowledged, do not discard yet but wait for
/// the source to come back with a Decide for this session, because the
/// source may already have sent its Commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub session: u64,
}

/// The first message after Hello on a new connection (v4): the source's
/// decision for a prepared migration whose link broke. The destination
/// answers a commit with Committed (it may have committed already) and
/// takes an abort as the end of the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decide {
    pub session: u64,
    pub commit: bool,
}

/// Source to destination (v5), right after the source paused the VM: the
/// blackout begins, so the destination's threads take the highest priority
/// the host allows until the VM runs there (or the migration ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlackoutBegins;

/// Destination to source (v5), after `Committed` and before `Resumed`:
/// the destination's share of the blackout, on its own clock, so the source
/// can add up the host-side downtime without comparing two hosts' clocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// From reading the Commit to the first vCPU entering the guest.
    pub commit_to_run_us: u64,
    /// From reading the Commit to writing Committed: taken off the source's
    /// round trip to leave the time on the link.
    pub commit_to_reply_us: u64,
    /// From reading the blackout round's RoundEnd (every last page here) to
    /// writing StateLoaded: what of the source's wait for StateLoaded was
    /// the state, and not the last pages still arriving. 0: not measured.
    pub last_pages_to_state_acked_us: u64,
}

/// Source to destination (v7), after the commit: frames addressed to the
/// VM that reached the source's network after the pause (held) or after the
/// commit (strays), oldest first, for the destination to deliver into the
/// guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    pub frames: Vec<Vec<u8>>,
    /// The frames held since the pause have all been sent: the destination
    /// may take the VM's frames from its own network from now on.
    pub held_done: bool,
}

/// Source to destination (v7): no more forwarded frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardEnd {
    pub forwarded: u64,
    /// Frames the source did not forward (beyond its limit).
    pub dropped: u64,
}

/// Source to destination (v8), the first frame on every connection of a
/// migration an agent prepared: the one-time token that binds the
/// connection to that migration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub token: [u8; 32],
}

impl std::fmt::Debug for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never in a log line.
        f.write_str("Bind { token: <redacted> }")
    }
}

/// Destination to source (v8): whether the connection is bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindAck {
    Accepted,
    Refused { reason: String },
}

/// Any control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Offer(Offer),
    Accept(Accept),
    Refuse(Refuse),
    RoundEnd(RoundEnd),
    StateLoaded(StateLoaded),
    Commit(Commit),
    Committed(Committed),
    Abort(Abort),
    Resumed(Resumed),
    PostcopyPrepare(PostcopyPrepare),
    Join(Join),
    PostcopyReady(PostcopyReady),
    PostcopyBegin(PostcopyBegin),
    PageRequest(PageRequest),
    PostcopyComplete(PostcopyComplete),
    Resume(Resume),
    ResumeState(ResumeState),
    StreamsOpen(StreamsOpen),
    StreamJoin(StreamJoin),
    StreamsOpened(StreamsOpened),
    StripedRound(StripedRound),
    Prepare(Prepare),
    Decide(Decide),
    BlackoutBegins(BlackoutBegins),
    Started(Started),
    Forwarded(Forwarded),
    ForwardEnd(ForwardEnd),
    Bind(Bind),
    BindAck(BindAck),
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    postcard::to_stdvec(value).expect("control messages always encode")
}

pub(super) fn decode<T: DeserializeOwned>(
    kind: FrameKind,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    let malformed = |reason: String| ProtocolError::Malformed { kind, reason };
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

impl Message {
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello(_) => FrameKind::Hello,
            Self::HelloAck(_) => FrameKind::HelloAck,
            Self::Offer(_) => FrameKind::Offer,
            Self::Accept(_) => FrameKind::Accept,
            Self::Refuse(_) => FrameKind::Refuse,
            Self::RoundEnd(_) => FrameKind::RoundEnd,
            Self::StateLoaded(_) => FrameKind::StateLoaded,
            Self::Commit(_) => FrameKind::Commit,
            Self::Committed(_) => FrameKind::Committed,
            Self::Abort(_) => FrameKind::Abort,
            Self::Resumed(_) => FrameKind::Resumed,
            Self::PostcopyPrepare(_) => FrameKind::PostcopyPrepare,
            Self::Join(_) => FrameKind::Join,
            Self::PostcopyReady(_) => FrameKind::PostcopyReady,
            Self::PostcopyBegin(_) => FrameKind::PostcopyBegin,
            Self::PageRequest(_) => FrameKind::PageRequest,
            Self::PostcopyComplete(_) => FrameKind::PostcopyComplete,
            Self::Resume(_) => FrameKind::Resume,
            Self::ResumeState(_) => FrameKind::ResumeState,
            Self::StreamsOpen(_) => FrameKind::StreamsOpen,
            Self::StreamJoin(_) => FrameKind::StreamJoin,
            Self::StreamsOpened(_) => FrameKind::StreamsOpened,
            Self::StripedRound(_) => FrameKind::StripedRound,
            Self::Prepare(_) => FrameKind::Prepare,
            Self::Decide(_) => FrameKind::Decide,
            Self::BlackoutBegins(_) => FrameKind::BlackoutBegins,
            Self::Started(_) => FrameKind::Started,
            Self::Forwarded(_) => FrameKind::Forwarded,
            Self::ForwardEnd(_) => FrameKind::ForwardEnd,
            Self::Bind(_) => FrameKind::Bind,
            Self::BindAck(_) => FrameKind::BindAck,
        }
    }

    /// The frame payload.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Hello(m) => encode(m),
            Self::HelloAck(m) => encode(m),
            Self::Offer(m) => super::offer_wire::encode(m),
            Self::Accept(m) => encode(m),
            Self::Refuse(m) => encode(m),
            Self::RoundEnd(m) => encode(m),
            Self::StateLoaded(m) => encode(m),
            Self::Commit(m) => encode(m),
            Self::Committed(m) => encode(m),
            Self::Abort(m) => encode(m),
            Self::Resumed(m) => encode(m),
            Self::PostcopyPrepare(m) => encode(m),
            Self::Join(m) => encode(m),
            Self::PostcopyReady(m) => encode(m),
            Self::PostcopyBegin(m) => encode(m),
            Self::PageRequest(m) => encode(m),
            Self::PostcopyComplete(m) => encode(m),
            Self::Resume(m) => encode(m),
            Self::ResumeState(m) => encode(m),
            Self::StreamsOpen(m) => encode(m),
            Self::StreamJoin(m) => encode(m),
            Self::StreamsOpened(m) => encode(m),
            Self::StripedRound(m) => encode(m),
            Self::Prepare(m) => encode(m),
            Self::Decide(m) => encode(m),
            Self::BlackoutBegins(m) => encode(m),
            Self::Started(m) => encode(m),
            Self::Forwarded(m) => encode(m),
            Self::ForwardEnd(m) => encode(m),
            Self::Bind(m) => encode(m),
            Self::BindAck(m) => encode(m),
        }
    }

    /// Decodes the payload of a control frame; every byte must be used.
    pub fn decode(kind: FrameKind, payload: &[u8]) -> Result<Self, ProtocolError> {
        Ok(match kind {
            FrameKind::Hello => Self::Hello(decode(kind, payload)?),
            FrameKind::HelloAck => Self::HelloAck(decode(kind, payload)?),
            FrameKind::Offer => Self::Offer(super::offer_wire::decode(payload)?),
            FrameKind::Accept => Self::Accept(decode(kind, payload)?),
            FrameKind::Refuse => Self::Refuse(decode(kind, payload)?),
            FrameKind::RoundEnd => Self::RoundEnd(decode(kind, payload)?),
            FrameKind::StateLoaded => Self::StateLoaded(decode(kind, payload)?),
            FrameKind::Commit => Self::Commit(decode(kind, payload)?),
            FrameKind::Committed => Self::Committed(decode(kind, payload)?),
            FrameKind::Abort => Self::Abort(decode(kind, payload)?),
            FrameKind::Resumed => Self::Resumed(decode(kind, payload)?),
            FrameKind::PostcopyPrepare => Self::PostcopyPrepare(decode(kind, payload)?),
            FrameKind::Join => Self::Join(decode(kind, payload)?),
            FrameKind::PostcopyReady => Self::PostcopyReady(decode(kind, payload)?),
            FrameKind::PostcopyBegin => Self::PostcopyBegin(decode(kind, payload)?),
            FrameKind::PageRequest => Self::PageRequest(decode(kind, payload)?),
            FrameKind::PostcopyComplete => Self::PostcopyComplete(decode(kind, payload)?),
            FrameKind::Resume => Self::Resume(decode(kind, payload)?),
            FrameKind::ResumeState => Self::ResumeState(decode(kind, payload)?),
            FrameKind::StreamsOpen => Self::StreamsOpen(decode(kind, payload)?),
            FrameKind::StreamJoin => Self::StreamJoin(decode(kind, payload)?),
            FrameKind::StreamsOpened => Self::StreamsOpened(decode(kind, payload)?),
            FrameKind::StripedRound => Self::StripedRound(decode(kind, payload)?),
            FrameKind::Prepare => Self::Prepare(decode(kind, payload)?),
            FrameKind::Decide => Self::Decide(decode(kind, payload)?),
            FrameKind::BlackoutBegins => Self::BlackoutBegins(decode(kind, payload)?),
            FrameKind::Started => Self::Started(decode(kind, payload)?),
            FrameKind::Forwarded => Self::Forwarded(decode(kind, payload)?),
            FrameKind::ForwardEnd => Self::ForwardEnd(decode(kind, payload)?),
            FrameKind::Bind => Self::Bind(decode(kind, payload)?),
            FrameKind::BindAck => Self::BindAck(decode(kind, payload)?),
            FrameKind::Pages | FrameKind::State => {
                return Err(ProtocolError::Unexpected {
                    expected: "a control message",
                    got: kind,
                })
            }
        })
    }
}

/// Sends one control message as one frame (one vectored write).
pub fn write_message(w: &mut impl Write, message: &Message) -> Result<(), ProtocolError> {
    write_frame(w, message.kind(), &message.encode())
}

/// Reads the payload of a control frame whose header was just read;
/// `scratch` is reused across calls.
pub fn read_message(
    r: &mut impl Read,
    header: &FrameHeader,
    scratch: &mut Vec<u8>,
) -> Result<Message, ProtocolError> {
    if !header.kind.is_control() {
        return Err(ProtocolError::Unexpected {
            expected: "a control message",
            got: header.kind,
        });
    }
    read_payload(r, header, scratch)?;
    Message::decode(header.kind, scratch)
}

/// Reads the next frame, which must be a control message.
pub fn recv_message(r: &mut impl Read, scratch: &mut Vec<u8>) -> Result<Message, ProtocolError> {
    let header = read_header(r)?;
    read_message(r, &header, scratch)
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
