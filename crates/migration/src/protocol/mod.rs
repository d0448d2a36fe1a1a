//! The wire protocol of a pre-copy live migration: framed, versioned,
//! checksummed, and ending in a commit handshake that decides where the VM
//! lives.
//!
//! # The sequence
//!
//! ```text
//!  source (owns the running VM)                    destination (holds nothing yet)
//!  ────────────────────────────                    ───────────────────────────────
//!  a migration an agent prepared (v8), first on every connection (main,
//!  extra streams, fault channel, reconnects), inside TLS:
//!  Bind{one-time token}                      ──▶   compared in constant time
//!                                            ◀──   BindAck{Accepted} | BindAck{Refused{reason}}
//!                                                  (refused: the connection is dropped and
//!                                                  the destination waits on)
//!  Hello{magic, versions min..max, Source}   ──▶
//!                                            ◀──   HelloAck{Accepted{version}}
//!                                                  | HelloAck{Refused{reason}}    (names both ranges)
//!  Offer{mem_bytes, vcpus, ram_ranges,       ──▶
//!        tsc_khz, cpuid, features,                 checks vCPUs, memory, CPUID, features;
//!        disks (v9), copies_disks (v10)}           reserves the memory; for copied disks
//!                                                  (v10) creates their images, whose
//!                                                  blocks then travel as pages at
//!                                                  DISK_COPY_BASE like memory's
//!                                            ◀──   Accept{reserved_bytes} | Refuse{reason}
//!
//!  round 1: every page, zero pages as zero runs
//!  Pages ... Pages                           ──▶   writes pages into reserved memory
//!  RoundEnd{round: 1, pages}                 ──▶   checks the page count
//!  rounds 2..n: pages dirtied since the last round
//!  Pages ... RoundEnd{round: n, pages}       ──▶
//!
//!  a large round on several streams (v3; StreamsOpen, StreamJoin and
//!  StreamsOpened set them up after Accept):
//!  StripedRound{round: k}                    ──▶   (main connection)
//!  stream i: Pages ... RoundEnd{k, pages_i}  ──▶   each stream writes only the
//!                                                  2 MiB stripes its index owns
//!  RoundEnd{round: k, Σ pages_i}             ──▶   (main) after every stream ended
//!
//!  blackout: pause the vCPUs
//!  BlackoutBegins                            ──▶   (v5) its threads take the highest
//!                                                  priority the host allows
//!  Pages ... (last dirty pages)              ──▶
//!  RoundEnd{round: n+1, pages}               ──▶
//!  State(encoded state record, ≤ 32 MiB)     ──▶   loads the state record
//!                                            ◀──   StateLoaded{state_len, state_crc}
//!  ═════════════════ commit point: the source gives the VM up ═════════════════
//!  Commit                                    ──▶   the destination owns the VM
//!                                            ◀──   Committed                    (and resumes it)
//!                                            ◀──   Started{commit_to_run_us,    (v5, once a vCPU
//!                                                    commit_to_reply_us}         entered the guest)
//!  a VM with a network device (v7):
//!  Forwarded{frames, held_done} ...          ──▶   delivered into the guest before
//!    (frames that reached the source since         anything from the destination's
//!     the pause, then strays)                      own network; the destination
//!  ForwardEnd{forwarded, dropped}            ──▶   announces the VM there at once
//!  after a post-copy commit (v11), the same Forwarded ... ForwardEnd go
//!  on the main connection between the pushed Pages, delivered as they come
//!  source VM torn down                       ◀──   Resumed{guest stall}         (optional, once
//!                                                  the guest has run: for the report)
//!
//!  Abort{reason} may be sent by either side at any point; the receiver of
//!  an Abort stops, and so does a side whose stream fails.
//! ```
//!
//! # Where the VM runs when something fails
//!
//! Up to and including the moment the source has sent `Commit`, the source
//! owns the VM. A refused Hello or Offer, an `Abort` from either side, a
//! peer that disconnects or crashes, a truncated or corrupt frame, a
//! protocol violation or a timeout, anywhere up to `StateLoaded`: the
//! source resumes its vCPUs if it had paused them (or never paused them, if
//! the failure came before the blackout), reports the reason, and the
//! destination discards everything it received and frees its reservation.
//! No page the destination wrote is ever run before the commit, which is why
//! a Pages frame may land in destination memory before its checksum is
//! verified.
//!
//! The source sends `Commit` only after a `StateLoaded` that echoes the
//! length and crc32 of the state it sent. The destination resumes the VM
//! only after it received `Commit`, so at no moment do both run it. The
//! one window left, the `Commit` frame itself getting lost, is the classic
//! two-generals gap: a destination that holds a loaded state but never sees
//! `Commit` must not resume, and a source that sent `Commit` but never sees
//! `Committed` must not resume either; resolving that (asking the
//! destination, or an agent, who owns the VM) belongs to the layer above.
//!
//! # Errors
//!
//! [`ProtocolError::is_retryable`](crate::ProtocolError::is_retryable) tells link failures (peer closed, stream
//! cut short, i/o error, timeout), after which a new attempt may succeed,
//! from corruption and violations, which are fatal to this peer pairing.

mod batch;
mod frame;
mod messages;
mod offer_wire;
mod pages;
mod version;

#[cfg(test)]
mod sequence_tests;

pub use batch::{BatchError, PageBatch};
pub use frame::{
    read_header, read_payload, read_state, write_frame, write_frame_checked, write_frame_vectored,
    write_state, FrameHeader, FrameKind, PayloadCheck, FLAG_LINK_CHECKED, FRAME_MAGIC, HEADER_LEN,
    KNOWN_FLAGS, MAX_CONTROL_PAYLOAD, MAX_PAGES_PAYLOAD, MAX_STATE_PAYLOAD,
};
pub use messages::{
    read_message, recv_message, write_message, Abort, Accept, Bind, BindAck, BlackoutBegins,
    Commit, Committed, Decide, DiskOffer, ForwardEnd, Forwarded, Hello, HelloAck, InvalidOffer,
    Join, Message, Offer, PageRequest, PostcopyBegin, PostcopyComplete, PostcopyPrepare,
    PostcopyReady, Prepare, RamRange, Refuse, Resume, ResumeState, Resumed, Role, RoundEnd,
    Started, StateLoaded, StreamJoin, StreamsOpen, StreamsOpened, StripedRound, DISK_COPY_BASE,
    DISK_COPY_STRIDE, HELLO_MAGIC,
};
pub use pages::{
    read_pages_into, write_pages, PageRun, PageSink, PagesSummary, MAX_BATCH_DATA_BYTES,
    MAX_BATCH_DATA_PAGES, MAX_BATCH_RUNS, PAGE_SIZE,
};
pub use version::{
    negotiate, NegotiationError, VersionRange, BLACKOUT_TIMING_VERSION, COMMIT_RECOVERY_VERSION,
    LINK_CHECKED_PAGES_VERSION, NET_HANDOVER_VERSION, POSTCOPY_FORWARD_VERSION, POSTCOPY_VERSION,
    PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, SESSION_TOKEN_VERSION, STORAGE_COPY_VERSION,
    STORAGE_VERSION, STREAMS_VERSION,
};
