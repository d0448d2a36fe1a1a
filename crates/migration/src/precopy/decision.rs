//! The commit decision outlives a broken link (protocol v4).
//!
//! Once the destination has acknowledged the state, only the source's
//! Commit may start the VM there. If the link breaks around that frame,
//! neither side alone knows whether it arrived: before v4 the destination
//! discarded the VM and the source kept it paused, so it ran nowhere. Now
//! the source names the migration (Prepare{session}) before the state; a
//! destination whose link breaks after acknowledging waits on its listener
//! for the source to come back with Decide{session, commit}, and after
//! committing it keeps answering such a Decide for a while, in case its
//! Committed was the frame lost. The source, missing its Committed, dials
//! again and repeats its decision until one of them answers.

use crate::transport::{Dialer, Link, Listener};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::precopy::error::MigrateError;
use crate::protocol::{recv_message, write_message, Abort, Committed, Decide, Message};
use crate::reconnect;

/// Destination, prepared, link broken: waits up to `window` for the
/// source's decision. Ok: the new connection and whether to commit.
pub(crate) fn await_decision(
    listener: &Listener,
    session: u64,
    window: Duration,
) -> Result<(Link, bool), String> {
    reconnect::wait_for_source(listener, window, |mut conn, first| match first {
        Message::Decide(d) if d.session == session => Ok((conn, d.commit)),
        other => {
            refuse(&mut conn, "no migration of that session waits here");
            Err(format!("expected our Decide, got {}", other.kind()))
        }
    })
}

/// Destination, committed: for `window`, tells a source that lost our
/// Committed that the VM runs here. In the background; the thread ends
/// with the window.
pub(crate) fn answer_late_decisions(
    listener: &Listener,
    session: u64,
    window: Duration,
) -> std::io::Result<()> {
    let listener = listener.try_clone()?;
    std::thread::Builder::new()
        .name("late-decisions".into())
        .spawn(move || {
            let deadline = Instant::now() + window;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let answered =
                    reconnect::wait_for_source(&listener, left, |mut conn, first| match first {
                        Message::Decide(d) if d.session == session && d.commit => {
                            write_message(&mut conn, &Message::Committed(Committed))
                                .map_err(|e| e.to_string())
                        }
                        Message::Decide(d) if d.session == session => {
                            refuse(&mut conn, "the VM was committed and runs here");
                            Ok(())
                        }
                        _ => {
                            refuse(&mut conn, "no migration of that session waits here");
                            Err("not ours".into())
                        }
                    });
                if answered.is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

fn refuse(conn: &mut Link, reason: &str) {
    let _ = write_message(
        conn,
        &Message::Abort(Abort {
            reason: reason.into(),
        }),
    );
}

/// Source, Commit sent (or perhaps sent), no Committed: repeats the
/// decision on new connections until the destination confirms or
/// `window` passes. Ok: the connection the confirmation came on.
pub(crate) fn confirm_commit(
    dialer: &Dialer,
    addr: SocketAddr,
    session: u64,
    window: Duration,
    io_timeout: Duration,
) -> Result<Link, MigrateError> {
    reconnect::keep_trying(window, || decide(dialer, addr, session, true, io_timeout))
}

/// Source, failed before its Commit: one short try to tell a destination
/// that may be waiting for the decision that there is none to wait for
/// (it gives up by itself after its window otherwise).
pub(crate) fn announce_abort(dialer: &Dialer, addr: SocketAddr, session: u64) {
    let _ = decide(dialer, addr, session, false, reconnect::DIAL_TIMEOUT);
}

fn decide(
    dialer: &Dialer,
    addr: SocketAddr,
    session: u64,
    commit: bool,
    io_timeout: Duration,
) -> Result<Link, MigrateError> {
    let stage = "repeating the commit decision";
    let mut conn = reconnect::dial(dialer, addr, io_timeout, stage)?;
    write_message(&mut conn, &Message::Decide(Decide { session, commit }))
        .map_err(MigrateError::protocol(stage))?;
    if !commit {
        return Ok(conn);
    }
    let mut scratch = Vec::new();
    match recv_message(&mut conn, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::Committed(_) => Ok(conn),
        Message::Abort(a) => Err(MigrateError::PeerAborted(a.reason)),
        other => Err(MigrateError::Unexpected {
            stage,
            expected: "Committed",
            got: other.kind(),
        }),
    }
}
