//! The blackout: pause, the last pages, the state, the commit; and the
//! clock that adds its parts up to the host-side downtime.

use super::*;
use crate::guest::PauseTiming;
use crate::protocol::{BlackoutBegins, Started, BLACKOUT_TIMING_VERSION};
use crate::stats::{
    BlackoutPart, BlackoutReport, PART_COMMIT, PART_COMMIT_ROUND_TRIP, PART_LAST_PAGES,
    PART_LAST_PAGES_ARRIVING, PART_RESUME, PART_STATE_SAVE, PART_STATE_TO_DESTINATION,
    PART_STORAGE, PART_WAKE,
};
use crate::thread_priority::Boost;

/// What the switchover decision expected of the blackout.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expected {
    pub(super) total: Duration,
    /// Of which sending the last pages.
    pub(super) pages: Duration,
    pub(super) forced: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn blackout<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    mut dirty: PageBitmap,
    expected: Expected,
    limit: Option<Duration>,
) -> Result<(), MigrateError> {
    let boost = Boost::start();
    run.report.blackout.priority = boost.level.describe();
    if run.version >= BLACKOUT_TIMING_VERSION {
        write_message(stream, &Message::BlackoutBegins(BlackoutBegins)).map_err(
            MigrateError::protocol("telling the destination the blackout begins"),
        )?;
    }
    if run.throttle > 0 {
        // A pause while the brake holds the vCPUs parked would add what is
        // left of that park to the blackout; let them go first.
        guest
            .set_throttle(0)
            .map_err(MigrateError::guest("releasing the brake"))?;
    }
    if run.disk_writes_held {
        // A write held for the copy would hold up the pause; the blackout
        // sends its block.
        guest
            .hold_disk_writes(false)
            .map_err(MigrateError::guest("ending write-blocking"))?;
    }
    let paused = guest
        .pause()
        .map_err(MigrateError::guest("pausing the VM"))?;
    let woke = Instant::now();
    run.paused = true;
    run.throttle = 0;
    let last = guest
        .harvest_dirty()
        .map_err(MigrateError::guest("harvesting the last dirty pages"))?;
    dirty.union_with(&last);
    if let Some(limit) = limit {
        // The hard limit holds against what is really left, not against
        // what the last live round suggested.
        let rate = run.link_rate();
        let fixed = expected.total.saturating_sub(expected.pages);
        let now = fixed + Duration::from_secs_f64(dirty.bytes() as f64 / rate) + woke.elapsed();
        if now > limit {
            return Err(MigrateError::DowntimeLimit(format!(
                "at the pause {:.1} MiB were left: a blackout of about {:.1} ms, over --max-downtime {:.1} ms; the VM was paused {:.2} ms and resumes here",
                dirty.bytes() as f64 / (1 << 20) as f64,
                now.as_secs_f64() * 1e3,
                limit.as_secs_f64() * 1e3,
                paused.all_stopped.elapsed().as_secs_f64() * 1e3
            )));
        }
    }
    let sent = send_round(guest, stream, sender, run, round, &dirty.runs(), true)?;
    let pages_sent = Instant::now();
    let handed = hand_over(guest, stream, run, run.recoverable_commit)?;
    drop(boost);
    run.clock = Some(BlackoutClock {
        paused,
        woke,
        pages_sent,
        handed,
    });
    let b = &mut run.report.blackout;
    b.predicted_ms = expected.total.as_secs_f64() * 1e3;
    b.prediction = format!(
        "{:.2} ms to send the last pages at the last rounds' rate, {:.2} ms of fixed costs",
        expected.pages.as_secs_f64() * 1e3,
        expected.total.saturating_sub(expected.pages).as_secs_f64() * 1e3
    );
    b.forced = expected.forced;
    b.final_pages = sent.pages;
    b.final_bytes = sent.bytes;
    run.expected_pages_ms = expected.pages.as_secs_f64() * 1e3;
    // Until the destination reports its share, the upper bound.
    run.clock
        .as_ref()
        .expect("just set")
        .fill(&mut run.report.blackout, None);
    run.report.total_ms = run.ms();
    run.report.throughput_mibs = mib_per_s(
        run.report.bytes_sent,
        run.report.total_ms - run.report.setup_ms,
    );
    Ok(())
}

/// The instants a blackout passed through on the source.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlackoutClock {
    pub(super) paused: PauseTiming,
    /// When the pause returned to the engine.
    pub(super) woke: Instant,
    pub(super) pages_sent: Instant,
    pub(super) handed: HandedOver,
}

impl BlackoutClock {
    /// Writes the parts and the downtime into `b`: exact with the
    /// destination's `Started`, an upper bound without it.
    pub(super) fn fill(&self, b: &mut BlackoutReport, started: Option<&Started>) {
        let ms =
            |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
        let h = &self.handed;
        let t0 = self.paused.all_stopped;
        b.stop_vcpus_ms = ms(self.paused.requested, t0);
        b.state_bytes = h.state_bytes;
        let mut parts = vec![
            (PART_WAKE, ms(t0, self.woke)),
            (PART_LAST_PAGES, ms(self.woke, self.pages_sent)),
        ];
        let save_from = match h.storage_released {
            Some((_, released)) => {
                parts.push((PART_STORAGE, ms(self.pages_sent, released)));
                released
            }
            None => self.pages_sent,
        };
        parts.push((PART_STATE_SAVE, ms(save_from, h.saved)));
        let state_wait = ms(h.saved, h.loaded);
        match started {
            Some(s) => {
                let round_trip = ms(h.commit_written, h.committed);
                let one_way = ((round_trip - s.commit_to_reply_us as f64 / 1e3) / 2.0).max(0.0);
                // The wait for StateLoaded began with the last pages still
                // on their way: what the destination did not spend on the
                // state (nor the answer's trip back) was their arrival.
                let state = if s.last_pages_to_state_acked_us > 0 {
                    (s.last_pages_to_state_acked_us as f64 / 1e3 + one_way).min(state_wait)
                } else {
                    state_wait
                };
                parts.push((PART_LAST_PAGES_ARRIVING, state_wait - state));
                parts.push((PART_STATE_TO_DESTINATION, state));
                parts.push((PART_COMMIT, ms(h.loaded, h.commit_written) + one_way));
                parts.push((PART_RESUME, s.commit_to_run_us as f64 / 1e3));
                b.exact = true;
                b.uncertainty_ms = one_way;
            }
            None => {
                parts.push((PART_STATE_TO_DESTINATION, state_wait));
                parts.push((PART_COMMIT_ROUND_TRIP, ms(h.loaded, h.committed)));
                b.exact = false;
                b.uncertainty_ms = 0.0;
            }
        }
        b.parts = parts
            .into_iter()
            .map(|(name, ms)| BlackoutPart {
                name: name.into(),
                ms,
            })
            .collect();
        b.host_downtime_ms = b.parts.iter().map(|p| p.ms).sum();
    }
}

/// What handing the state over measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct HandedOver {
    pub(super) state_bytes: u64,
    /// When the disk's flush and lock release began and ended (a VM with
    /// storage only).
    pub(super) storage_released: Option<(Instant, Instant)>,
    pub(super) saved: Instant,
    /// `StateLoaded` read.
    pub(super) loaded: Instant,
    pub(super) commit_written: Instant,
    /// `Committed` read.
    pub(super) committed: Instant,
}

/// With the VM paused: sends the state record, waits until the destination
/// loaded exactly it, then commits. From the Commit on, the VM is the
/// destination's.
pub(super) fn hand_over<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
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
            dialer: stream.dialer(),
            session,
            window,
            io_timeout,
        });
    }
    let storage_from = Instant::now();
    let storage_released = guest
        .release_storage()
        .map_err(MigrateError::guest("handing the VM's disk over"))?
        .then(|| (storage_from, Instant::now()));
    let state = guest
        .save_state()
        .map_err(MigrateError::guest("saving the VM state"))?;
    let saved = Instant::now();
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
    let loaded = Instant::now();
    write_message(stream, &Message::Commit(Commit))
        .map_err(|e| MigrateError::CommitUnacknowledged(error_chain(&e)))?;
    let commit_written = Instant::now();
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
        let Some(r) = run.commit_recovery.clone() else {
            return Err(MigrateError::CommitUnacknowledged(why));
        };
        run.say(format!(
            "no Committed ({why}); asking the destination again for up to {:?}",
            r.window
        ));
        let t_retry = Instant::now();
        *stream = decision::confirm_commit(&r.dialer, r.addr, r.session, r.window, r.io_timeout)
            .map_err(|e| {
                MigrateError::CommitUnacknowledged(format!("{why}; then: {}", error_chain(&e)))
            })?;
        run.report.blackout.commit_recovered = Some(format!(
            "{why}; the destination confirmed on a new connection {:.0} ms later",
            t_retry.elapsed().as_secs_f64() * 1e3
        ));
    }
    Ok(HandedOver {
        state_bytes: state.len() as u64,
        storage_released,
        saved,
        loaded,
        commit_written,
        committed: Instant::now(),
    })
}
