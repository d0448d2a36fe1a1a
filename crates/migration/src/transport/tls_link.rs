//! A TLS 1.3 connection that two threads can use at once, one reading and
//! one writing, without either holding a lock across socket I/O.
//!
//! rustls keeps one state per connection for both directions. A writer
//! encrypts under the state's lock into a buffer of its own, lets go of the
//! lock, and only then writes the buffer to the socket (under a second lock
//! that keeps whole writes in order). A reader reads raw bytes from the
//! socket without the state's lock, then takes it only to hand the bytes to
//! rustls and take the plaintext out. So a reader blocked on a quiet socket
//! never stalls a writer, and a writer blocked on a full socket never
//! stalls a reader.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use ferry_identity::PeerIdentity;

/// Raw bytes read from the socket at once.
const RAW_CHUNK: usize = 64 << 10;
/// Plaintext rustls may hold encrypted-but-unsent per connection; writes
/// are drained after every call, so this only bounds one call's records.
const SEND_LIMIT: usize = 256 << 10;

/// The shared half of a TLS link; every clone of a [`super::Link`] points
/// at one.
pub(super) struct TlsLink {
    conn: Mutex<rustls::Connection>,
    tcp: TcpStream,
    read: Mutex<ReadSide>,
    /// Held for a whole encrypt-then-send, so records reach the socket in
    /// the order rustls numbered them.
    write: Mutex<Vec<u8>>,
    /// A write failed after part of its records were sent: the stream is
    /// cut mid-record and every later write must fail too.
    broken: AtomicBool,
    peer: PeerIdentity,
    suite: String,
}

#[derive(Default)]
struct ReadSide {
    /// Raw bytes from the socket not yet given to rustls.
    raw: Vec<u8>,
    raw_pos: usize,
    /// Plaintext taken out of rustls by a peek and not yet read.
    plain: Vec<u8>,
    plain_pos: usize,
    /// The socket said end of stream.
    eof: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves the state as consistent as rustls left it;
    // the next I/O reports whatever is wrong.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
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

impl TlsLink {
    pub(super) fn new(mut conn: rustls::Connection, tcp: TcpStream, peer: PeerIdentity) -> Self {
        conn.set_buffer_limit(Some(SEND_LIMIT));
        let suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "unknown suite".into());
        TlsLink {
            conn: Mutex::new(conn),
            tcp,
            read: Mutex::new(ReadSide::default()),
            write: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
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
            if side.plain_pos < side.plain.len() {
                let n = buf.len().min(side.plain.len() - side.plain_pos);
                buf[..n].copy_from_slice(&side.plain[side.plain_pos..side.plain_pos + n]);
                side.plain_pos += n;
                if side.plain_pos == side.plain.len() {
                    side.plain.clear();
                    side.plain_pos = 0;
                }
                return Ok(n);
            }
            if let Some(n) = self.take_plaintext(&mut side, buf)? {
                return Ok(n);
            }
            self.fill_raw(&mut side)?;
        }
    }

    /// Plaintext rustls holds or can make from the raw bytes already read;
    /// None when it needs more from the socket.
    fn take_plaintext(&self, side: &mut ReadSide, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut conn = lock(&self.conn);
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) => return Err(e),
            }
            if side.raw_pos < side.raw.len() {
                let mut rest = &side.raw[side.raw_pos..];
                let n = conn.read_tls(&mut rest)?;
                if n == 0 {
                    return Err(io::Error::other("TLS: rustls took no bytes"));
                }
                side.raw_pos += n;
                conn.process_new_packets().map_err(tls_error)?;
                continue;
            }
            if side.eof {
                // Tell rustls; its reader then reports the end.
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets().map_err(tls_error)?;
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(Some(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(0)),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                    Err(e) => return Err(e),
                }
            }
            return Ok(None);
        }
    }

    /// One read from the socket, without the connection's lock.
    fn fill_raw(&self, side: &mut ReadSide) -> io::Result<()> {
        side.raw.resize(RAW_CHUNK, 0);
        side.raw_pos = 0;
        let got = loop {
            match (&self.tcp).read(&mut side.raw) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match got {
            Ok(n) => {
                side.raw.truncate(n);
                side.eof = n == 0;
                Ok(())
            }
            Err(e) => {
                side.raw.clear();
                Err(e)
            }
        }
    }

    /// Whether a read would find something, without blocking.
    pub(super) fn ready_now(&self) -> io::Result<Ready> {
        let mut side = lock(&self.read);
        if side.plain_pos < side.plain.len() {
            return Ok(Ready::Data);
        }
        if let Some(ready) = self.peek_plaintext(&mut side)? {
            return Ok(ready);
        }
        if !super::poll_readable(&self.tcp, std::time::Duration::ZERO)? {
            return Ok(Ready::Nothing);
        }
        // Readable: this read does not block.
        self.fill_raw(&mut side)?;
        // A whole record makes plaintext; part of one means a frame is on
        // its way.
        Ok(self.peek_plaintext(&mut side)?.unwrap_or(Ready::Data))
    }

    /// Moves plaintext rustls can give now into the peek buffer.
    fn peek_plaintext(&self, side: &mut ReadSide) -> io::Result<Option<Ready>> {
        let mut chunk = [0u8; 4096];
        Ok(match self.take_plaintext(side, &mut chunk)? {
            Some(0) => Some(Ready::Closed),
            Some(n) => {
                side.plain.extend_from_slice(&chunk[..n]);
                Some(Ready::Data)
            }
            None => None,
        })
    }

    /// True when a read would not block (or the link ended), false if
    /// `timeout` passed first.
    pub(super) fn wait_readable(&self, timeout: std::time::Duration) -> io::Result<bool> {
        {
            let mut side = lock(&self.read);
            if side.plain_pos < side.plain.len() || self.peek_plaintext(&mut side)?.is_some() {
                return Ok(true);
            }
        }
        super::poll_readable(&self.tcp, timeout)
    }

    /// Encrypts and sends `bufs` (as much of them as rustls takes at once).
    pub(super) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.write);
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this TLS link failed part way",
            ));
        }
        out.clear();
        let n = {
            let mut conn = lock(&self.conn);
            let n = conn.writer().write_vectored(bufs)?;
            while conn.wants_write() {
                conn.write_tls(&mut *out)?;
            }
            n
        };
        self.send(&out)?;
        Ok(n)
    }

    fn send(&self, mut out: &[u8]) -> io::Result<()> {
        let total = out.len();
        while !out.is_empty() {
            match (&self.tcp).write(out) {
                Ok(0) => {
                    self.broken.store(total != out.len(), Ordering::Release);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Records are numbered: a partly sent one can never be
                    // completed by a retry of the caller's bytes.
                    self.broken.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Sends close_notify if no write is under way (best effort).
    pub(super) fn close_notify(&self) {
        let Ok(mut out) = self.write.try_lock() else {
            return;
        };
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        out.clear();
        {
            let mut conn = lock(&self.conn);
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut *out).is_err() {
                    return;
                }
            }
        }
        let bytes = std::mem::take(&mut *out);
        if let Err(e) = self.send(&bytes) {
            tracing::debug!("sending TLS close_notify: {e}");
        }
    }
}
