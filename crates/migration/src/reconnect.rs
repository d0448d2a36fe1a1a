//! A source coming back on a new connection after its link broke: to
//! resume a post-copy, or to repeat its commit decision. Both sides of
//! that meeting live here: the source dials and says Hello again, the
//! destination waits on its listener for a source that does.

use crate::transport::{Dialer, Link, Listener};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::postcopy::channel::link_failed;
use crate::precopy::error::MigrateError;
use crate::protocol::{recv_message, write_message, Hello, HelloAck, Message, Role, VersionRange};

/// How long one attempt to reach the destination again may take.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a source whose link failed tries to reach the destination.
const DIAL_EVERY: Duration = Duration::from_millis(200);
/// How long a returning source may take over its greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Source side: runs `attempt` (which dials) until it succeeds, fails for
/// a reason other than the link, or `window` has passed.
pub(crate) fn keep_trying<T>(
    window: Duration,
    mut attempt: impl FnMut() -> Result<T, MigrateError>,
) -> Result<T, MigrateError> {
    let deadline = Instant::now() + window;
    loop {
        match attempt() {
            Err(e) if link_failed(&e) && Instant::now() < deadline => {
                std::thread::sleep(DIAL_EVERY);
            }
            done => return done,
        }
    }
}

/// Source side: connects to `addr` and negotiates again.
pub(crate) fn dial(
    dialer: &Dialer,
    addr: SocketAddr,
    io_timeout: Duration,
    stage: &'static str,
) -> Result<Link, MigrateError> {
    let io = |e: std::io::Error| MigrateError::Protocol {
        stage,
        source: e.into(),
    };
    let mut conn = dialer.dial(addr, DIAL_TIMEOUT).map_err(|e| io(e.into()))?;
    conn.set_read_timeout(Some(io_timeout)).map_err(io)?;
    conn.set_write_timeout(Some(io_timeout)).map_err(io)?;
    let mut scratch = Vec::new();
    write_message(&mut conn, &Message::Hello(Hello::new(Role::Source)))
        .map_err(MigrateError::protocol(stage))?;
    match recv_message(&mut conn, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::HelloAck(HelloAck::Accepted { .. }) => Ok(conn),
        Message::HelloAck(HelloAck::Refused { reason }) => Err(MigrateError::Refused(reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "HelloAck",
            got: other.kind(),
        }),
    }
}

/// Destination side: accepts connections on `listener` until `greet`
/// takes one (each comes with the first message after its Hello), or
/// `timeout` has passed. Connections `greet` refuses are dropped.
pub(crate) fn wait_for_source<T>(
    listener: &Listener,
    timeout: Duration,
    mut greet: impl FnMut(Link, Message) -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let io = |e: std::io::Error| format!("waiting for the source: {e}");
    let taken = loop {
        if Instant::now() >= deadline {
            break Err(format!("no source came back within {timeout:?}"));
        }
        // Again each time: `greet` may have used the listener blocking.
        listener.set_nonblocking(true).map_err(io)?;
        match listener.accept() {
            Ok((conn, _)) => {
                if let Ok((conn, first)) = hello_again(conn) {
                    if let Ok(taken) = greet(conn, first) {
                        break Ok(taken);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => break Err(io(e)),
        }
    };
    listener.set_nonblocking(false).map_err(io)?;
    taken
}

/// Answers a returning source's Hello; returns the message after it.
fn hello_again(mut conn: Link) -> Result<(Link, Message), String> {
    let err = |e: &dyn std::fmt::Display| format!("greeting a returning source: {e}");
    conn.set_nonblocking(false).map_err(|e| err(&e))?;
    conn.set_nodelay(true).map_err(|e| err(&e))?;
    conn.set_read_timeout(Some(GREETING_TIMEOUT))
        .map_err(|e| err(&e))?;
    conn.set_write_timeout(Some(GREETING_TIMEOUT))
        .map_err(|e| err(&e))?;
    let mut scratch = Vec::new();
    let hello = match recv_message(&mut conn, &mut scratch).map_err(|e| err(&e))? {
        Message::Hello(h) => h,
        other => return Err(err(&format!("expected Hello, got {}", other.kind()))),
    };
    let ack = hello.answer(VersionRange::SUPPORTED, Role::Destination);
    write_message(&mut conn, &Message::HelloAck(ack.clone())).map_err(|e| err(&e))?;
    if let HelloAck::Refused { reason } = ack {
        return Err(err(&reason));
    }
    let first = recv_message(&mut conn, &mut scratch).map_err(|e| err(&e))?;
    Ok((conn, first))
}
