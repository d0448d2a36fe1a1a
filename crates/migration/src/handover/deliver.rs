//! The destination's half: deliver what the source forwards.
//!
//! [`Delivery`] takes the messages one at a time, so that post-copy's
//! reader, which gets them between page batches, delivers them as they
//! come; pre-copy reads them off a link that carries nothing else.

use std::time::{Duration, Instant};

use super::{DeliverReport, DestinationNetwork, ForwardLimits, HandoverError};
use crate::protocol::{recv_message, ForwardEnd, Forwarded, Message};
use crate::transport::Link;

/// Beyond the source's window, how long the destination waits for its
/// ForwardEnd (the link's own delays).
pub const GRACE: Duration = Duration::from_secs(2);

/// Right after the start: delivers the forwarded frames into the guest,
/// opens this host's network to the VM once the held frames are in (or on
/// any failure: the VM runs here either way), and returns at the source's
/// ForwardEnd. Bounded by the source's window and a grace period.
pub fn deliver_forwarded(
    link: &mut Link,
    net: &mut dyn DestinationNetwork,
    limits: &ForwardLimits,
) -> DeliverReport {
    let mut delivery = Delivery::new(Box::new(net), limits);
    if let Err(e) = read_all(link, &mut delivery) {
        delivery.give_up(crate::precopy::error_chain(&e));
    }
    delivery.finish()
}

fn read_all(link: &mut Link, delivery: &mut Delivery<'_>) -> Result<(), HandoverError> {
    let mut scratch = Vec::new();
    let link_error = |stage| move |source| HandoverError::Link { stage, source };
    while delivery.expecting() {
        let left = delivery.time_left();
        if left.is_zero() {
            break;
        }
        link.set_read_timeout(Some(left))
            .map_err(|e| link_error("waiting for forwarded frames")(crate::ProtocolError::Io(e)))?;
        match recv_message(link, &mut scratch).map_err(link_error("reading forwarded frames"))? {
            Message::Forwarded(f) => delivery.forwarded(f)?,
            Message::ForwardEnd(end) => delivery.ended(&end),
            other => {
                return Err(link_error("reading forwarded frames")(
                    crate::ProtocolError::Unexpected {
                        expected: "Forwarded or ForwardEnd",
                        got: other.kind(),
                    },
                ))
            }
        }
    }
    Ok(())
}

/// Delivery as the messages come: frames into the guest, this host's
/// network opened at the held-done mark, done at `ForwardEnd` or once the
/// source's window and a grace period have passed. Its clock starts at
/// `new` (the start).
pub struct Delivery<'n> {
    net: Box<dyn DestinationNetwork + 'n>,
    t0: Instant,
    limit: Duration,
    opened: bool,
    ended: bool,
    report: DeliverReport,
}

impl<'n> Delivery<'n> {
    pub fn new(net: Box<dyn DestinationNetwork + 'n>, limits: &ForwardLimits) -> Self {
        Self {
            net,
            t0: Instant::now(),
            limit: limits.window + GRACE,
            opened: false,
            ended: false,
            report: DeliverReport::default(),
        }
    }

    /// True while more forwarded frames may come.
    pub fn expecting(&self) -> bool {
        !self.ended
    }

    /// How long more may still come before delivery gives up on them.
    pub fn time_left(&self) -> Duration {
        self.limit.saturating_sub(self.t0.elapsed())
    }

    /// Delivers one `Forwarded`; opens this host's network after the
    /// held frames. Err only if opening failed (the caller gives up).
    pub fn forwarded(&mut self, f: Forwarded) -> Result<(), HandoverError> {
        for frame in f.frames {
            let len = frame.len() as u64;
            match self.net.deliver(frame) {
                Ok(()) => {
                    self.report.delivered += 1;
                    self.report.bytes += len;
                }
                Err(_) => self.report.refused += 1,
            }
        }
        if f.held_done {
            self.open().map_err(|source| HandoverError::Device {
                stage: "opening this host's network to the VM",
                source,
            })?;
        }
        Ok(())
    }

    /// The source's `ForwardEnd`: nothing more comes.
    pub fn ended(&mut self, end: &ForwardEnd) {
        self.report.source_forwarded = Some(end.forwarded);
        self.report.source_dropped = Some(end.dropped);
        self.ended = true;
        self.ensure_open();
    }

    /// Gives up on what may still come (the link failed, the source broke
    /// the protocol, or time ran out): this host's network opens now.
    pub fn give_up(&mut self, why: String) {
        self.report.error.get_or_insert(why);
        self.ended = true;
        self.ensure_open();
    }

    /// Gives up once the source's window and the grace period are over;
    /// true if it did now.
    pub fn check_deadline(&mut self) -> bool {
        if self.ended || !self.time_left().is_zero() {
            return false;
        }
        self.give_up(format!("no ForwardEnd within {:?}", self.limit));
        true
    }

    pub fn report(&self) -> &DeliverReport {
        &self.report
    }

    pub fn finish(mut self) -> DeliverReport {
        if self.ended {
            return self.report;
        }
        if !self.check_deadline() {
            self.give_up("delivery ended before the source's ForwardEnd".into());
        }
        self.report
    }

    fn open(&mut self) -> Result<(), crate::guest::GuestError> {
        if self.opened {
            return Ok(());
        }
        // Opened or failed: it is not tried twice.
        self.opened = true;
        self.report.opened_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        self.net.open()
    }

    fn ensure_open(&mut self) {
        if let Err(e) = self.open() {
            self.report
                .error
                .get_or_insert(format!("opening this host's network to the VM failed: {e}"));
        }
    }
}
