//! The probe's TCP side: one connection made inside the client's
//! namespace, requests `<seq>\n` written by the sender, and a reader
//! thread that matches the server's `R <seq>\n` replies to them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tally::{Arrival, Tally};
use super::tcp_info::total_retransmissions;
use crate::netns::in_netns;
use crate::NetlabError;

/// How long a blocked read waits before looking at the stop flag.
const READ_POLL: Duration = Duration::from_millis(20);
/// A write that blocks this long means the connection is wedged.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The contract's longest request line, and a bound on a reply line.
const MAX_LINE: usize = 128;

/// Everything both threads update.
pub(crate) struct TcpState {
    pub(crate) send_times: Vec<Instant>,
    pub(crate) tally: Tally,
    pub(crate) malformed: u64,
    pub(crate) counter_breaks: u64,
    pub(crate) resets: u64,
    pub(crate) closed_by_peer: u64,
    pub(crate) other_errors: u64,
    pub(crate) reconnects: u64,
    /// Send slots with no connection to send on.
    pub(crate) unsent: u64,
    /// Retransmissions of connections already replaced.
    pub(crate) retrans_before: u32,
    pub(crate) last_error: Option<String>,
    /// Which connection is current, and whether it broke.
    generation: u64,
    broken: bool,
}

impl TcpState {
    pub(crate) fn new() -> TcpState {
        TcpState {
            send_times: Vec::new(),
            tally: Tally::default(),
            malformed: 0,
            counter_breaks: 0,
            resets: 0,
            closed_by_peer: 0,
            other_errors: 0,
            reconnects: 0,
            unsent: 0,
            retrans_before: 0,
            last_error: None,
            generation: 0,
            broken: false,
        }
    }

    /// Records that connection `generation` broke, once per connection.
    fn mark_broken(&mut self, generation: u64, how: Broken, detail: String) {
        if generation != self.generation || self.broken {
            return;
        }
        self.broken = true;
        match how {
            Broken::Reset => self.resets += 1,
            Broken::Closed => self.closed_by_peer += 1,
            Broken::Other => self.other_errors += 1,
        }
        self.last_error = Some(detail);
    }
}

enum Broken {
    Reset,
    Closed,
    Other,
}

fn classify(e: &std::io::Error) -> Broken {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Broken::Reset
        }
        _ => Broken::Other,
    }
}

pub(crate) struct TcpConn {
    stream: TcpStream,
    generation: u64,
    reader: Option<JoinHandle<()>>,
}

pub(crate) struct TcpSide {
    pub(crate) ns: String,
    pub(crate) target: SocketAddr,
    pub(crate) connect_timeout: Duration,
    pub(crate) state: Arc<Mutex<TcpState>>,
    /// Tells the readers to stop.
    pub(crate) stop_readers: Arc<AtomicBool>,
    pub(crate) deadline: Instant,
}

impl TcpSide {
    /// Connects from the client's namespace and starts the reader.
    pub(crate) fn connect(&self) -> Result<TcpConn, NetlabError> {
        let (target, timeout) = (self.target, self.connect_timeout);
        let stream = in_netns(&self.ns, move || {
            TcpStream::connect_timeout(&target, timeout)
        })?
        .map_err(|source| NetlabError::Connect {
            ns: self.ns.clone(),
            target,
            timeout_ms: timeout.as_millis() as u64,
            source,
        })?;
        let io = |what: &str, source| NetlabError::Io {
            ns: self.ns.clone(),
            what: what.to_string(),
            source,
        };
        stream
            .set_nodelay(true)
            .map_err(|e| io("setting TCP_NODELAY", e))?;
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| io("setting a write timeout", e))?;
        let reading = stream
            .try_clone()
            .map_err(|e| io("cloning the probe's socket", e))?;
        reading
            .set_read_timeout(Some(READ_POLL))
            .map_err(|e| io("setting a read timeout", e))?;
        let generation = {
            let mut st = self.state.lock().unwrap();
            st.generation += 1;
            st.broken = false;
            st.generation
        };
        let state = Arc::clone(&self.state);
        let stop = Arc::clone(&self.stop_readers);
        let deadline = self.deadline;
        let reader = std::thread::Builder::new()
            .name("probe tcp reader".into())
            .spawn(move || read_replies(reading, generation, state, stop, deadline))
            .map_err(|source| NetlabError::Thread {
                ns: self.ns.clone(),
                source,
            })?;
        Ok(TcpConn {
            stream,
            generation,
            reader: Some(reader),
        })
    }

    /// Whether connection `conn` broke.
    pub(crate) fn is_broken(&self, conn: &TcpConn) -> bool {
        let st = self.state.lock().unwrap();
        st.generation != conn.generation || st.broken
    }

    /// Sends the next request on `conn`.
    pub(crate) fn send(&self, conn: &mut TcpConn) {
        let seq = {
            let mut st = self.state.lock().unwrap();
            // Recorded before the write, so a reply never beats its record.
            st.send_times.push(Instant::now());
            st.send_times.len() as u64
        };
        let line = format!("{seq}\n");
        if let Err(e) = conn.stream.write_all(line.as_bytes()) {
            let how = classify(&e);
            let detail = format!("writing request {seq}: {e}");
            self.state
                .lock()
                .unwrap()
                .mark_broken(conn.generation, how, detail);
        }
    }

    /// Reads the connection's retransmissions and closes it.
    pub(crate) fn retire(&self, mut conn: TcpConn) {
        let retrans = total_retransmissions(&conn.stream).unwrap_or(0);
        {
            let mut st = self.state.lock().unwrap();
            st.retrans_before += retrans;
            // Our own close is not the peer's: the reader's EOF after the
            // shutdown belongs to no current connection.
            if st.generation == conn.generation {
                st.generation += 1;
            }
        }
        let _ = conn.stream.shutdown(Shutdown::Both);
        if let Some(reader) = conn.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_replies(
    mut stream: TcpStream,
    generation: u64,
    state: Arc<Mutex<TcpState>>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut expected_counter = 1u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => {
                let mut st = state.lock().unwrap();
                st.mark_broken(
                    generation,
                    Broken::Closed,
                    "the server closed the connection".into(),
                );
                return;
            }
            Ok(n) => {
                let now = Instant::now();
                let mut st = state.lock().unwrap();
                for &b in &buf[..n] {
                    if b != b'\n' {
                        if line.len() < MAX_LINE {
                            line.push(b);
                        }
                        continue;
                    }
                    record_reply(&mut st, &line, now, &mut expected_counter);
                    line.clear();
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let how = classify(&e);
                state
                    .lock()
                    .unwrap()
                    .mark_broken(generation, how, format!("reading replies: {e}"));
                return;
            }
        }
    }
}

/// Parses `R <seq>` and counts it.
fn record_reply(st: &mut TcpState, line: &[u8], now: Instant, expected_counter: &mut u64) {
    let parsed = std::str::from_utf8(line).ok().and_then(|s| {
        let (r, seq) = s.trim_end_matches('\r').split_once(' ')?;
        Some((r.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
    });
    let Some((counter, seq)) = parsed else {
        st.malformed += 1;
        return;
    };
    if counter != *expected_counter {
        st.counter_breaks += 1;
    }
    *expected_counter = counter + 1;
    let sent_at = seq
        .checked_sub(1)
        .and_then(|i| st.send_times.get(i as usize).copied());
    // The first reply's gap counts from the first request.
    let baseline = st.send_times.first().copied().unwrap_or(now);
    if st.tally.record(seq, now, sent_at, baseline) == Arrival::Unknown {
        st.malformed += 1;
    }
}
