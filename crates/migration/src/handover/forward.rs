//! The source's half: forward what reached the VM's old place.
//!
//! [`Forwarder`] does it a step at a time, so that post-copy can slip the
//! frames in between its page batches on the same link; pre-copy, whose
//! link has nothing else to carry by then, runs it to the end at once.

use std::time::{Duration, Instant};

use super::{ForwardLimits, ForwardReport, HandoverError, SourceNetwork, FRAMES_PER_MESSAGE};
use crate::protocol::{write_message, ForwardEnd, Forwarded, Message};
use crate::transport::Link;

/// How often the source looks for strays while none come.
pub const STRAY_POLL: Duration = Duration::from_millis(1);

/// Right after the commit: sends the frames held since the pause, marks
/// their end, then forwards strays until the fabric has gone quiet or the
/// window closes, and ends with `ForwardEnd`. A failing link ends it early:
/// the VM runs on the destination whatever happens here, so the failure is
/// reported, not returned.
pub fn forward_after_commit(
    link: &mut Link,
    net: &mut dyn SourceNetwork,
    limits: &ForwardLimits,
) -> ForwardReport {
    let mut forwarder = Forwarder::new(net, *limits);
    forwarder.run_to_end(link);
    forwarder.finish()
}

/// What one [`Forwarder::pump`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// Nothing waits at the old place now: look again in a while.
    Idle,
    /// The step's budget ran out with frames perhaps still waiting.
    Busy,
    /// Forwarding is over (ForwardEnd sent, or given up on).
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Sending what arrived between the pause and the commit.
    Held,
    /// Sending strays; the last one came at `last` (or the held ones
    /// ended then).
    Strays {
        last: Instant,
    },
    Done,
}

/// Forwarding as a state machine: held frames, the held-done mark,
/// strays, `ForwardEnd`. Its clock starts at `new` (the commit).
pub struct Forwarder<'n> {
    net: &'n mut dyn SourceNetwork,
    limits: ForwardLimits,
    t0: Instant,
    phase: Phase,
    report: ForwardReport,
}

impl<'n> Forwarder<'n> {
    pub fn new(net: &'n mut dyn SourceNetwork, limits: ForwardLimits) -> Self {
        Self {
            net,
            limits,
            t0: Instant::now(),
            phase: Phase::Held,
            report: ForwardReport::default(),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Sends what is due now, at most `budget` messages. A link that fails
    /// ends forwarding (its error is in the report) and is returned, so
    /// that a caller sharing the link sees it at once; a device that fails
    /// ends forwarding quietly, reported.
    pub fn pump(&mut self, link: &mut Link, budget: usize) -> Result<Pumped, HandoverError> {
        match self.step(link, budget) {
            Err(e @ HandoverError::Device { .. }) => {
                // What was sent stands; the destination need not wait out
                // its grace period for the rest.
                self.report.error = Some(crate::precopy::error_chain(&e));
                self.end(link).map(|()| Pumped::Done).inspect_err(|e| {
                    self.abandon(crate::precopy::error_chain(e));
                })
            }
            Err(e) => {
                self.abandon(crate::precopy::error_chain(&e));
                Err(e)
            }
            ok => ok,
        }
    }

    /// Pumps until forwarding is over; the link is this one's alone.
    pub fn run_to_end(&mut self, link: &mut Link) {
        loop {
            match self.pump(link, usize::MAX) {
                Ok(Pumped::Idle) => std::thread::sleep(STRAY_POLL),
                Ok(Pumped::Busy) => {}
                Ok(Pumped::Done) | Err(_) => return,
            }
        }
    }

    /// Stops forwarding without `ForwardEnd` (the link is gone): frames
    /// still waiting are lost, and `why` says so in the report.
    pub fn abandon(&mut self, why: String) {
        if !self.is_done() {
            self.phase = Phase::Done;
            self.report.window_ms = self.ms();
        }
        self.report.error.get_or_insert(why);
    }

    pub fn finish(mut self) -> ForwardReport {
        if !self.is_done() {
            self.abandon("forwarding was cut short before its end".into());
        }
        self.report
    }

    fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    fn step(&mut self, link: &mut Link, budget: usize) -> Result<Pumped, HandoverError> {
        let mut sent = 0;
        loop {
            if sent >= budget {
                return Ok(Pumped::Busy);
            }
            let in_window = self.t0.elapsed() < self.limits.window;
            match self.phase {
                Phase::Held => {
                    // Everything waiting now arrived while the VM was paused.
                    let batch = self.take("taking the frames held since the pause")?;
                    if !batch.is_empty() && in_window {
                        let n = self.send(link, batch, false)?;
                        self.report.held += n;
                    } else {
                        self.report.dropped += batch.len() as u64;
                        self.send(link, Vec::new(), true)?;
                        self.report.held_sent_ms = self.ms();
                        self.phase = Phase::Strays {
                            last: Instant::now(),
                        };
                    }
                }
                Phase::Strays { last } => {
                    if !in_window || last.elapsed() >= self.limits.quiet {
                        self.end(link)?;
                        return Ok(Pumped::Done);
                    }
                    let batch = self.take("taking stray frames")?;
                    if batch.is_empty() {
                        return Ok(Pumped::Idle);
                    }
                    self.phase = Phase::Strays {
                        last: Instant::now(),
                    };
                    let n = self.send(link, batch, false)?;
                    self.report.strays += n;
                }
                Phase::Done => return Ok(Pumped::Done),
            }
            sent += 1;
        }
    }

    fn end(&mut self, link: &mut Link) -> Result<(), HandoverError> {
        let end = Message::ForwardEnd(ForwardEnd {
            forwarded: self.report.held + self.report.strays,
            dropped: self.report.dropped,
        });
        write_message(link, &end).map_err(|source| HandoverError::Link {
            stage: "ending the forwarding",
            source,
        })?;
        self.phase = Phase::Done;
        self.report.window_ms = self.ms();
        Ok(())
    }

    fn take(&mut self, stage: &'static str) -> Result<Vec<Vec<u8>>, HandoverError> {
        self.net
            .take_waiting(FRAMES_PER_MESSAGE)
            .map_err(|source| HandoverError::Device { stage, source })
    }

    /// Sends one batch (what `max_frames` still allows of it); how many
    /// frames went.
    fn send(
        &mut self,
        link: &mut Link,
        mut frames: Vec<Vec<u8>>,
        held_done: bool,
    ) -> Result<u64, HandoverError> {
        let report = &mut self.report;
        let sent_so_far = report.held + report.strays;
        let room = self.limits.max_frames.saturating_sub(sent_so_far) as usize;
        if frames.len() > room {
            report.dropped += (frames.len() - room) as u64;
            frames.truncate(room);
        }
        if frames.is_empty() && !held_done {
            return Ok(0);
        }
        let n = frames.len() as u64;
        report.bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        write_message(link, &Message::Forwarded(Forwarded { frames, held_done })).map_err(
            |source| HandoverError::Link {
                stage: "forwarding frames",
                source,
            },
        )?;
        Ok(n)
    }
}
