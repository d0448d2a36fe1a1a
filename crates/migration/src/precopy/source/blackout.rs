//! The blackout: pause, the last pages, the state, the commit.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn blackout<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    mut dirty: PageBitmap,
    predicted: Duration,
    forced: bool,
) -> Result<(), MigrateError> {
    let t_pause = Instant::now();
    guest
        .pause()
        .map_err(MigrateError::guest("pausing the VM"))?;
    run.paused = true;
    run.throttle = 0;
    let pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    let last = guest
        .harvest_dirty()
        .map_err(MigrateError::guest("harvesting the last dirty pages"))?;
    dirty.union_with(&last);
    let sent = send_round(guest, stream, sender, run, round, &dirty.runs(), true)?;

    let handed = hand_over(guest, stream, run, run.recoverable_commit)?;
    let b = &mut run.report.blackout;
    b.host_downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    b.predicted_ms = predicted.as_secs_f64() * 1e3;
    b.forced = forced;
    b.pause_ms = pause_ms;
    b.final_pages = sent.pages;
    b.final_bytes = sent.bytes;
    handed.record(b);
    run.report.total_ms = run.ms();
    run.report.throughput_mibs = mib_per_s(
        run.report.bytes_sent,
        run.report.total_ms - run.report.setup_ms,
    );
    Ok(())
}

/// What handing the state over measured.
pub(super) struct HandedOver {
    pub(super) state_bytes: u64,
    pub(super) state_save_ms: f64,
    pub(super) state_load_ms: f64,
    pub(super) commit_ms: f64,
}

impl HandedOver {
    pub(super) fn record(&self, b: &mut crate::stats::BlackoutReport) {
        b.state_bytes = self.state_bytes;
        b.state_save_ms = self.state_save_ms;
        b.state_load_ms = self.state_load_ms;
        b.commit_ms = self.commit_ms;
    }
}

/// With the VM paused: sends the state record, waits until the destination
/// loaded exactly it, then commits. From the Commit on, the VM is the
/// destination's.
pub(super) fn hand_over<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut TcpStream,
    run: &mut Run<'_>,
    recovery: Option<(Duration, Duration)>,
) -> Result<HandedOver, MigrateError> {
    if let Some((window, io_timeout)) = recovery {
        let stage = "preparing the commit";
        let addr = stream.peer_addr().map_err(|e| MigrateError::Protocol {
            stage,
            source: e.into(),
        })?;
        let session = new_session();
        write_message(stream, &Message::Prepare(Prepare { session }))
            .map_err(MigrateError::protocol(stage))?;
        run.commit_recovery = Some(CommitRecovery {
            addr,
            session,
            window,
            io_timeout,
        });
    }
    let t_save = Instant::now();
    let state = guest
        .save_state()
        .map_err(MigrateError::guest("saving the VM state"))?;
    let state_save_ms = t_save.elapsed().as_secs_f64() * 1e3;
    let t_state = Instant::now();
    let stage = "sending the VM state";
    write_state(stream, &state).map_err(MigrateError::protocol(stage))?;
    stream.flush().map_err(|e| MigrateError::Protocol {
        stage,
        source: e.into(),
    })?;
    let crc = crc32fast::hash(&state);
    let mut scratch = Vec::new();
    let stage = "waiting for the destination to load the state";
    match recv_message(stream, &mut scratch).map_err(MigrateError::protocol(stage))? {
        Message::StateLoaded(ack) => {
            if ack.state_len != state.len() as u64 || ack.state_crc != crc {
                return Err(MigrateError::StateMismatch {
                    len: state.len() as u64,
                    crc,
                    got_len: ack.state_len,
                    got_crc: ack.state_crc,
                });
            }
        }
        Message::Abort(a) => return Err(MigrateError::PeerAborted(a.reason)),
        other => {
            return Err(MigrateError::Unexpected {
                stage,
                expected: "StateLoaded",
                got: other.kind(),
            })
        }
    }
    let state_load_ms = t_state.elapsed().as_secs_f64() * 1e3;
    let t_commit = Instant::now();
    write_message(stream, &Message::Commit(Commit))
        .map_err(|e| MigrateError::CommitUnacknowledged(error_chain(&e)))?;
    run.commit_sent = true;
    let unacknowledged = match recv_message(stream, &mut scratch) {
        Ok(Message::Committed(_)) => None,
        Ok(other) => Some(format!(
            "the destination sent {} instead of Committed",
            other.kind()
        )),
        Err(e) => Some(error_chain(&e)),
    };
    if let Some(why) = unacknowledged {
        let Some(r) = run.commit_recovery else {
            return Err(MigrateError::CommitUnacknowledged(why));
        };
        run.say(format!(
            "no Committed ({why}); asking the destination again for up to {:?}",
            r.window
        ));
        let t_retry = Instant::now();
        *stream =
            decision::confirm_commit(r.addr, r.session, r.window, r.io_timeout).map_err(|e| {
                MigrateError::CommitUnacknowledged(format!("{why}; then: {}", error_chain(&e)))
            })?;
        run.report.blackout.commit_recovered = Some(format!(
            "{why}; the destination confirmed on a new connection {:.0} ms later",
            t_retry.elapsed().as_secs_f64() * 1e3
        ));
    }
    Ok(HandedOver {
        state_bytes: state.len() as u64,
        state_save_ms,
        state_load_ms,
        commit_ms: t_commit.elapsed().as_secs_f64() * 1e3,
    })
}

