//! A small blocking client for QMP, the QEMU Machine Protocol: JSON objects,
//! one a line, over a Unix socket. Enough to drive a migration: the greeting,
//! `qmp_capabilities`, and commands answered in order. Asynchronous events
//! that arrive between a command and its answer are set aside (the latest
//! [`KEPT_EVENTS`]) for [`Qmp::take_events`]: nothing here waits on an event,
//! `query-migrate` is polled, and the `MIGRATION` events only fill in the
//! states a poll can miss.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How many unread events a connection keeps; older ones are dropped.
pub const KEPT_EVENTS: usize = 256;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("QEMU did not answer on QMP within {0:?}")]
    Timeout(Duration),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// QEMU refused or failed the command; `class` is QEMU's error class
    /// (usually `GenericError`), `desc` its human-readable reason.
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
}

/// One QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    /// Bytes of a line not yet complete: kept across a timed-out read so
    /// the next read does not start in the middle of a message.
    pending: Vec<u8>,
    greeting: Value,
    /// Events read while waiting for answers, oldest first.
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to a QMP server socket (one attempt) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Qmp::handshake(UnixStream::connect(path)?, timeout)
    }

    /// Reads the greeting on an open connection and leaves capability
    /// negotiation mode. Every later read waits at most `timeout`.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            timeout,
            next_id: 0,
            pending: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version as the greeting gave it, e.g. `7.2.22`.
    pub fn version(&self) -> Option<String> {
        let v = self.greeting.pointer("/QMP/version/qemu")?;
        Some(format!("{}.{}.{}", v["major"], v["minor"], v["micro"]))
    }

    /// Changes how long later reads and writes wait.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))?;
        self.writer.set_write_timeout(Some(timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// The events (whole messages: `event`, `data`, `timestamp`) that
    /// arrived with earlier answers, oldest first, and forgets them. Every
    /// event QEMU sent before an answer is in by the time that answer is
    /// returned; later ones wait for the next command.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let (id, line) = self.command_line(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.io_error(e))?;
        self.answer(id)
    }

    /// [`Qmp::execute`] with `fd` passed along (SCM_RIGHTS), for `getfd`:
    /// QEMU then holds its own copy of the descriptor under the name given.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.command_line(command, arguments);
        let sent = send_with_fd(&self.writer, line.as_bytes(), fd).map_err(|e| self.io_error(e))?;
        // The descriptor went with the first byte; the rest, if the
        // socket took only part, goes as usual.
        self.writer
            .write_all(&line.as_bytes()[sent..])
            .map_err(|e| self.io_error(e))?;
        self.answer(id)
    }

    fn command_line(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (id, line)
    }

    /// Reads until the answer to command `id`, setting events aside.
    fn answer(&mut self, id: u64) -> Result<Value, QmpError> {
        loop {
            let mut reply = self.read_message()?;
            if let Some(event) = reply.get("event") {
                tracing::debug!(%event, data = %reply["data"], "QMP event");
                if self.events.len() == KEPT_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(reply);
                continue;
            }
            // An answer to an earlier command that timed out: its caller
            // has already given up on it.
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!(%reply, "stale QMP answer skipped");
                continue;
            }
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = reply.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(reply.to_string()));
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let complete = match self.reader.read_until(b'\n', &mut self.pending) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) => self.pending.ends_with(b"\n"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(e)),
            };
            if !complete {
                // End of stream in the middle of a line.
                return Err(QmpError::Closed);
            }
            let line = std::mem::take(&mut self.pending);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| {
                QmpError::Protocol(format!("{e} in {:?}", String::from_utf8_lossy(&line)))
            });
        }
    }

    fn io_error(&self, e: io::Error) -> QmpError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout(self.timeout),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Closed,
            _ => QmpError::Io(e),
        }
    }
}

/// Sends `bytes` on `socket` with one descriptor in an SCM_RIGHTS message;
/// returns how many bytes went (at least one, or an error).
fn send_with_fd(socket: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fd_len = std::mem::size_of::<libc::c_int>() as libc::c_uint;
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(fd_len), libc::CMSG_LEN(fd_len)) };
    // u64 words: the control buffer must be aligned for a cmsghdr.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid, empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as usize;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes, room
    // for exactly one cmsghdr carrying one descriptor, so CMSG_FIRSTHDR is
    // non-null and CMSG_DATA has room for the descriptor written there.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = cmsg_len as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
        // `iov` and `control` outlive the call; the descriptors are open.
        libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    match sent {
        n if n > 0 => Ok(n as usize),
        0 => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "sendmsg sent nothing",
        )),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::thread;

    /// A scripted QEMU: checks each command it receives and sends the
    /// canned lines back.
    fn fake_qemu(script: Vec<(&'static str, Vec<String>)>) -> (UnixStream, thread::JoinHandle<()>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            let mut reader = BufReader::new(server.try_clone().unwrap());
            let mut out = server;
            out.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\r\n").unwrap();
            for (want, replies) in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let msg: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(msg["execute"], want, "{line}");
                let id = msg["id"].to_string();
                for reply in replies {
                    out.write_all(reply.replace("ID", &id).as_bytes()).unwrap();
                    out.write_all(b"\r\n").unwrap();
                }
            }
        });
        (client, handle)
    }

    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let (stream, server) = fake_qemu(vec![
            ("qmp_capabilities", vec![r#"{"return": {}, "id": ID}"#.into()]),
            (
                "query-status",
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#.into(),
                    r#"{"return": {"status": "running", "running": true}, "id": ID}"#.into(),
                ],
            ),
            (
                "migrate",
                vec![r#"{"id": ID, "error": {"class": "GenericError", "desc": "There's a migration process in progress"}}"#.into()],
            ),
        ]);
        let mut qmp = Qmp::handshake(stream, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version().as_deref(), Some("7.2.22"));
        assert!(qmp.take_events().is_empty());
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        let events = qmp.take_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["event"], "RESUME");
        assert!(qmp.take_events().is_empty());
        let err = qmp
            .execute("migrate", Some(json!({"uri": "tcp:127.0.0.1:1"})))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GenericError: There's a migration process in progress"
        );
        server.join().unwrap();
        assert!(matches!(
            qmp.execute("query-status", None),
            Err(QmpError::Closed)
        ));
    }

    /// Receives one message and the descriptor that came with it, as QEMU
    /// does for `getfd`.
    fn recv_with_fd(socket: &UnixStream) -> (Vec<u8>, Option<std::os::fd::OwnedFd>) {
        use std::os::fd::FromRawFd;
        let mut data = vec![0u8; 4096];
        let mut control = vec![0u64; 8];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid, empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        // SAFETY: the buffers outlive the call and their sizes are the ones
        // given; a descriptor received is owned here from then on.
        unsafe {
            let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
            assert!(n > 0, "{}", io::Error::last_os_error());
            data.truncate(n as usize);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            let fd = (!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS).then(|| {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                std::os::fd::OwnedFd::from_raw_fd(raw)
            });
            (data, fd)
        }
    }

    #[test]
    fn a_descriptor_goes_with_its_command() {
        let (client, server) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let mut out = server.try_clone().unwrap();
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut answers = Vec::new();
            for _ in 0..2 {
                let (line, fd) = recv_with_fd(&server);
                let msg: Value = serde_json::from_slice(&line).unwrap();
                answers.push((msg["execute"].as_str().unwrap().to_owned(), fd));
                let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", msg["id"]);
                out.write_all(reply.as_bytes()).unwrap();
            }
            answers
        });
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).unwrap();
        // A pipe whose write end goes to the peer: what it writes there
        // comes out of the read end kept here.
        let (mut read_end, write_end) = std::io::pipe().unwrap();
        qmp.execute_with_fd("getfd", Some(json!({ "fdname": "x" })), write_end.as_fd())
            .unwrap();
        drop(write_end);
        let answers = peer.join().unwrap();
        assert_eq!(answers[0].0, "qmp_capabilities");
        assert!(answers[0].1.is_none());
        assert_eq!(answers[1].0, "getfd");
        let passed = answers.into_iter().nth(1).unwrap().1.expect("a descriptor");
        std::fs::File::from(passed).write_all(b"hello").unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut read_end, &mut got).unwrap();
        assert_eq!(got, "hello");
    }

    #[test]
    fn a_silent_qemu_times_out() {
        let (client, _server) = UnixStream::pair().unwrap();
        let err = Qmp::handshake(client, Duration::from_millis(50))
            .err()
            .expect("no greeting");
        assert!(matches!(err, QmpError::Timeout(_)), "{err}");
    }
}
