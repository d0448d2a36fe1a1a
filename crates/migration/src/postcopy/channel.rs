//! Small pieces both sides of post-copy need: waiting for a socket to have
//! data without committing to read a frame, and session numbers that pair
//! the fault channel with its migration.

use crate::transport::{Link, Listener};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::precopy::error::MigrateError;
use crate::protocol::{recv_message, write_message, Join, Message, PostcopyPrepare};

/// How long either side waits for the other to open the fault channel.
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// True when `stream` has bytes to read (or is closed: the read that
/// follows reports that), false if `timeout` passed first. Lets a reader
/// look up between frames without a read timeout that could cut a frame.
pub(crate) fn wait_readable(stream: &Link, timeout: Duration) -> std::io::Result<bool> {
    stream.wait_readable(timeout)
}

/// A number no other migration on this host is likely to use.
pub(crate) fn new_session() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Raises the calling thread's priority: a vCPU waits on every request
/// these threads serve, and on a busy host an ordinary thread can wait
/// milliseconds for a core. Best effort: without CAP_SYS_NICE the thread
/// keeps its priority and post-copy still works, only slower to fault.
pub(crate) fn serve_faults_promptly() {
    // A thread started by one that yielded (SCHED_IDLE) inherits that
    // policy, under which a nice value means nothing.
    crate::thread_priority::normal();
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the
    // calling thread on Linux, whose nice value is per thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, FAULT_SERVICE_NICE);
    }
}

/// Nice value of the threads on a fault's path.
const FAULT_SERVICE_NICE: i32 = -10;

/// Source side: announces the fault channel on `main`, opens it to the
/// same address and joins it to `session`, then waits until the
/// destination has it.
pub(crate) fn open_fault_channel(
    main: &mut Link,
    session: u64,
    io_timeout: Duration,
) -> Result<Link, MigrateError> {
    let stage = "opening the fault channel";
    let io = |e: std::io::Error| MigrateError::Protocol {
        stage,
        source: e.into(),
    };
    write_message(main, &Message::PostcopyPrepare(PostcopyPrepare { session }))
        .map_err(MigrateError::protocol(stage))?;
    let addr = main.peer_addr().map_err(io)?;
    let mut fault = main
        .dial_sibling(addr, JOIN_TIMEOUT)
        .map_err(|e| io(e.into()))?;
    fault.set_write_timeout(Some(io_timeout)).map_err(io)?;
    write_message(&mut fault, &Message::Join(Join { session }))
        .map_err(MigrateError::protocol(stage))?;
    let mut scratch = Vec::new();
    match recv_message(main, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::PostcopyReady(_) => Ok(fault),
        Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "PostcopyReady",
            got: other.kind(),
        }),
    }
}

/// Destination side: accepts connections on `listener` until one opens
/// with `Join{session}`; others are dropped. Err says why, for a human.
pub(crate) fn accept_fault_channel(listener: &Listener, session: u64) -> Result<Link, String> {
    accept_joining(
        listener,
        "the fault channel",
        |m| matches!(m, Message::Join(j) if j.session == session),
    )
    .map(|(conn, _)| conn)
}

/// Accepts connections on `listener` until one opens with a message
/// `ours` takes, and returns it with that message; other connections are
/// someone else's and are dropped. `what` names the connection in errors.
pub(crate) fn accept_joining(
    listener: &Listener,
    what: &str,
    mut ours: impl FnMut(&Message) -> bool,
) -> Result<(Link, Message), String> {
    let io = |e: std::io::Error| format!("opening {what}: {e}");
    let deadline = Instant::now() + JOIN_TIMEOUT;
    listener.set_nonblocking(true).map_err(io)?;
    let joined = loop {
        match listener.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false).map_err(io)?;
                conn.set_read_timeout(Some(JOIN_TIMEOUT)).map_err(io)?;
                let mut scratch = Vec::new();
                match recv_message(&mut conn, &mut scratch) {
                    Ok(m) if ours(&m) => break Ok((conn, m)),
                    _ => continue,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(format!(
                        "the source did not open {what} within {JOIN_TIMEOUT:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => break Err(io(e)),
        }
    };
    listener.set_nonblocking(false).map_err(io)?;
    let (conn, message) = joined?;
    conn.set_nodelay(true).map_err(io)?;
    conn.set_read_timeout(None).map_err(io)?;
    Ok((conn, message))
}

/// True for failures of the link itself, after which a new connection
/// may succeed (as opposed to a peer that broke the protocol).
pub(crate) fn link_failed(e: &MigrateError) -> bool {
    matches!(e, MigrateError::Protocol { source, .. } if source.is_retryable())
}
