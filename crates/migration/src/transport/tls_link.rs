//! A TLS 1.3 connection that two threads can use at once, one reading and
//! one writing, without either holding a lock across the other's I/O.
//!
//! rustls shakes hands and authenticates the peer; then the link takes the
//! traffic keys over and runs the record layer itself (see `records`), so
//! each direction owns its own key and lock. A writer seals the caller's
//! bytes into records and sends them with one vectored write, under the
//! write lock only (which also keeps the records in the order they were
//! numbered). A reader reads large chunks of the socket into its own
//! buffer and opens each record in place there, under the read lock only;
//! the caller's bytes are then copied once out of that buffer. So a reader
//! blocked on a quiet socket never stalls a writer, and a writer blocked on
//! a full socket never stalls a reader.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use ferry_identity::PeerIdentity;

use super::records::{self, Opened, Opener, Sealer, HEADER_LEN, MAX_RECORD};

/// Bytes read from the socket at once, at most: a few records per read
/// system call, yet a buffer that stays in the CPU's caches.
const RAW_CAPACITY: usize = 256 << 10;
/// Plaintext sealed by one write call: a whole 256 KiB Pages frame, its
/// header and run table included, goes out in one vectored write.
const SEND_LIMIT: usize = 1 << 20;

/// The shared half of a TLS link; every clone of a [`super::Link`] points
/// at one.
pub(super) struct TlsLink {
    tcp: TcpStream,
    read: Mutex<ReadSide>,
    write: Mutex<WriteSide>,
    peer: PeerIdentity,
    suite: String,
}

struct ReadSide {
    /// None when the link could not take the keys over (`failed` says why).
    opener: Option<Opener>,
    failed: Option<String>,
    /// Bytes read from the socket; opened records' plaintext stays here.
    buf: Vec<u8>,
    /// Plaintext not yet read, inside `buf`.
    plain: Range<usize>,
    /// Bytes of records not yet opened, inside `buf`, after `plain`.
    raw: Range<usize>,
    /// The peer sent close_notify.
    closed: bool,
    /// The socket said end of stream.
    eof: bool,
}

struct WriteSide {
    sealer: Option<Sealer>,
    failed: Option<String>,
    /// Records sealed by the current call, reused across calls.
    records: Vec<Vec<u8>>,
    /// A write failed after part of its records were sent (or were
    /// numbered): the stream is cut mid-record and every later write must
    /// fail too.
    broken: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves the state as consistent as it was left; the
    // next I/O reports whatever is wrong.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn failed_link(why: &str) -> io::Error {
    io::Error::other(format!(
        "TLS: this link could not take over its keys: {why}"
    ))
}

/// What a look at the link without blocking found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Nothing to read yet.
    Nothing,
    /// Data (perhaps only the start of it) is there: a read will get it.
    Data,
    /// The peer closed the connection.
    Closed,
}

/// The record layer's keys and whatever plaintext rustls had already
/// received, taken out of a connection whose handshake is done.
fn take_over(mut conn: rustls::Connection) -> Result<(Sealer, Opener, Vec<u8>), String> {
    let pending = conn
        .process_new_packets()
        .map_err(|e| e.to_string())?
        .plaintext_bytes_to_read();
    let mut early = vec![0u8; pending];
    conn.reader()
        .read_exact(&mut early)
        .map_err(|e| e.to_string())?;
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or("no cipher suite was negotiated")?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| e.to_string())?;
    let (sealer, opener) =
        records::take_over(suite, secrets.tx, secrets.rx).map_err(|e| e.to_string())?;
    Ok((sealer, opener, early))
}

impl TlsLink {
    pub(super) fn new(conn: rustls::Connection, tcp: TcpStream, peer: PeerIdentity) -> Self {
        let suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown suite".into());
        let (sealer, opener, early, failed) = match take_over(conn) {
            Ok((sealer, opener, early)) => (Some(sealer), Some(opener), early, None),
            Err(why) => {
                tracing::error!("TLS link with {peer}: cannot take over its keys: {why}");
                (None, None, Vec::new(), Some(why))
            }
        };
        let mut buf = vec![0u8; RAW_CAPACITY.max(early.len() + MAX_RECORD)];
        buf[..early.len()].copy_from_slice(&early);
        TlsLink {
            tcp,
            read: Mutex::new(ReadSide {
                opener,
                failed: failed.clone(),
                buf,
                plain: 0..early.len(),
                raw: early.len()..early.len(),
                closed: false,
                eof: false,
            }),
            write: Mutex::new(WriteSide {
                sealer,
                failed,
                records: Vec::new(),
                broken: false,
            }),
            peer,
            suite,
        }
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub(super) fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    pub(super) fn suite(&self) -> &str {
        &self.suite
    }

    /// Reads plaintext; blocks (within the socket's read timeout) until
    /// some arrives. An end of stream without close_notify reads as an end
    /// of stream, as on TCP: the protocol's own framing and its commit
    /// handshake catch a truncation.
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut side = lock(&self.read);
        loop {
            if !side.plain.is_empty() {
                return Ok(side.take_plain(buf));
            }
            if side.closed {
                return Ok(0);
            }
            if side.open_next()? {
                continue;
            }
            if side.eof {
                return Ok(0);
            }
            side.fill(&self.tcp)?;
        }
    }

    /// Whether a read would find something, without blocking.
    pub(super) fn ready_now(&self) -> io::Result<Ready> {
        let mut side = lock(&self.read);
        if let Some(ready) = side.ready_in_hand()? {
            return Ok(ready);
        }
        if !super::poll_readable(&self.tcp, std::time::Duration::ZERO)? {
            return Ok(Ready::Nothing);
        }
        // Readable: this read does not block.
        side.fill(&self.tcp)?;
        // A whole record makes plaintext; part of one means a frame is on
        // its way.
        Ok(side.ready_in_hand()?.unwrap_or(Ready::Data))
    }

    /// True when a read would not block (or the link ended), false if
    /// `timeout` passed first.
    pub(super) fn wait_readable(&self, timeout: std::time::Duration) -> io::Result<bool> {
        {
            let mut side = lock(&self.read);
            if matches!(side.ready_in_hand()?, Some(Ready::Data | Ready::Closed)) {
                return Ok(true);
            }
        }
        super::poll_readable(&self.tcp, timeout)
    }

    /// Seals and sends `bufs` (up to [`SEND_LIMIT`] bytes of them).
    pub(super) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut guard = lock(&self.write);
        let side = &mut *guard;
        if side.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this TLS link failed part way",
            ));
        }
        let Some(sealer) = side.sealer.as_mut() else {
            return Err(failed_link(side.failed.as_deref().unwrap_or("")));
        };
        side.records.clear();
        let n = match sealer.seal_data(bufs, SEND_LIMIT, &mut side.records) {
            Ok(n) => n,
            Err(e) => {
                // Records may have been numbered and never sent.
                side.broken = true;
                return Err(e.into());
            }
        };
        let records = std::mem::take(&mut side.records);
        let sent = self.send(&records);
        side.records = records;
        if sent.is_err() {
            // Records are numbered: a partly sent one can never be
            // completed by a retry of the caller's bytes.
            side.broken = true;
        }
        sent.map(|()| n)
    }

    /// Writes whole records with as few system calls as the socket allows.
    fn send(&self, records: &[Vec<u8>]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = records.iter().map(|r| IoSlice::new(r)).collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match (&self.tcp).write_vectored(left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends close_notify if no write is under way (best effort).
    pub(super) fn close_notify(&self) {
        let Ok(mut side) = self.write.try_lock() else {
            return;
        };
        if side.broken {
            return;
        }
        let Some(sealer) = side.sealer.as_mut() else {
            return;
        };
        let alert = match sealer.seal_close_notify() {
            Ok(alert) => alert,
            Err(e) => {
                tracing::debug!("sealing TLS close_notify: {e}");
                return;
            }
        };
        if let Err(e) = self.send(&[alert]) {
            side.broken = true;
            tracing::debug!("sending TLS close_notify: {e}");
        }
    }
}

impl ReadSide {
    fn take_plain(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.plain.len());
        out[..n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
        self.plain.start += n;
        n
    }

    /// Opens the next record if the buffer holds all of it: true if it
    /// did (its plaintext, perhaps empty, is then in `plain`, or `closed`
    /// is set), false if more bytes must come first.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(opener) = self.opener.as_mut() else {
            return Err(failed_link(self.failed.as_deref().unwrap_or("")));
        };
        if self.raw.len() < HEADER_LEN {
            return Ok(false);
        }
        let at = self.raw.start;
        let header: [u8; HEADER_LEN] = self.buf[at..at + HEADER_LEN]
            .try_into()
            .expect("a header-sized slice");
        let body_len = records::body_len(&header)?;
        if self.raw.len() < HEADER_LEN + body_len {
            return Ok(false);
        }
        let body = at + HEADER_LEN..at + HEADER_LEN + body_len;
        self.raw.start = body.end;
        match opener.open(&mut self.buf[body.clone()])? {
            Opened::Data(range) => {
                self.plain = body.start + range.start..body.start + range.end;
            }
            Opened::CloseNotify => self.closed = true,
        }
        Ok(true)
    }

    /// What a read would find without touching the socket: None if it
    /// would have to read the socket first (nothing, or only part of a
    /// record, is buffered).
    fn ready_in_hand(&mut self) -> io::Result<Option<Ready>> {
        loop {
            if !self.plain.is_empty() {
                return Ok(Some(Ready::Data));
            }
            if self.closed {
                return Ok(Some(Ready::Closed));
            }
            if !self.open_next()? {
                break;
            }
        }
        if self.eof {
            return Ok(Some(Ready::Closed));
        }
        Ok(None)
    }

    /// One read from the socket into the free end of the buffer, moving
    /// what is left of a record to the front first if a whole one might
    /// not fit behind it. Only called with no plaintext pending.
    fn fill(&mut self, tcp: &TcpStream) -> io::Result<()> {
        debug_assert!(self.plain.is_empty());
        if self.raw.is_empty() {
            self.raw = 0..0;
        } else if self.raw.start + MAX_RECORD > self.buf.len() {
            self.buf.copy_within(self.raw.clone(), 0);
            self.raw = 0..self.raw.len();
        }
        self.plain = self.raw.start..self.raw.start;
        let got = loop {
            match (&*tcp).read(&mut self.buf[self.raw.end..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.raw.end += got;
        self.eof = got == 0;
        Ok(())
    }
}
