//! The destination's half: deliver what the source forwards.

use std::time::{Duration, Instant};

use super::{DeliverReport, DestinationNetwork, ForwardLimits, HandoverError};
use crate::protocol::{recv_message, Message};
use crate::transport::Link;

/// Beyond the source's window, how long the destination waits for its
/// ForwardEnd (the link's own delays).
const GRACE: Duration = Duration::from_secs(2);

/// Right after the start: delivers the forwarded frames into the guest,
/// opens this host's network to the VM once the held frames are in (or on
/// any failure: the VM runs here either way), and returns at the source's
/// ForwardEnd. Bounded by the source's window and a grace period.
pub fn deliver_forwarded(
    link: &mut Link,
    net: &mut dyn DestinationNetwork,
    limits: &ForwardLimits,
) -> DeliverReport {
    let t0 = Instant::now();
    let mut report = DeliverReport::default();
    let mut opened = false;
    let result = deliver(
        link,
        net,
        limits.window + GRACE,
        t0,
        &mut report,
        &mut opened,
    );
    if let Err(e) = result {
        report.error = Some(crate::precopy::error_chain(&e));
    }
    if !opened {
        if let Err(e) = net.open() {
            report
                .error
                .get_or_insert(format!("opening this host's network to the VM failed: {e}"));
        }
        report.opened_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    report
}

fn deliver(
    link: &mut Link,
    net: &mut dyn DestinationNetwork,
    limit: Duration,
    t0: Instant,
    report: &mut DeliverReport,
    opened: &mut bool,
) -> Result<(), HandoverError> {
    let mut scratch = Vec::new();
    let link_error = |stage| move |source| HandoverError::Link { stage, source };
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err(link_error("waiting for forwarded frames")(
                crate::ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no ForwardEnd within {limit:?}"),
                )),
            ));
        }
        link.set_read_timeout(Some(left))
            .map_err(|e| link_error("waiting for forwarded frames")(crate::ProtocolError::Io(e)))?;
        match recv_message(link, &mut scratch).map_err(link_error("reading forwarded frames"))? {
            Message::Forwarded(f) => {
                for frame in f.frames {
                    let len = frame.len() as u64;
                    match net.deliver(frame) {
                        Ok(()) => {
                            report.delivered += 1;
                            report.bytes += len;
                        }
                        Err(_) => report.refused += 1,
                    }
                }
                if f.held_done && !*opened {
                    net.open().map_err(|source| HandoverError::Device {
                        stage: "opening this host's network to the VM",
                        source,
                    })?;
                    *opened = true;
                    report.opened_ms = t0.elapsed().as_secs_f64() * 1e3;
                }
            }
            Message::ForwardEnd(end) => {
                report.source_forwarded = Some(end.forwarded);
                report.source_dropped = Some(end.dropped);
                return Ok(());
            }
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
}
