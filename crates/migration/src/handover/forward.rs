//! The source's half: forward what reached the VM's old place.

use std::time::{Duration, Instant};

use super::{ForwardLimits, ForwardReport, HandoverError, SourceNetwork, FRAMES_PER_MESSAGE};
use crate::protocol::{write_message, ForwardEnd, Forwarded, Message};
use crate::transport::Link;

/// How often the source looks for strays while none come.
const STRAY_POLL: Duration = Duration::from_millis(1);

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
    let t0 = Instant::now();
    let mut report = ForwardReport::default();
    if let Err(e) = forward(link, net, limits, t0, &mut report) {
        report.error = Some(crate::precopy::error_chain(&e));
    }
    report.window_ms = t0.elapsed().as_secs_f64() * 1e3;
    report
}

fn forward(
    link: &mut Link,
    net: &mut dyn SourceNetwork,
    limits: &ForwardLimits,
    t0: Instant,
    report: &mut ForwardReport,
) -> Result<(), HandoverError> {
    // Everything waiting now arrived while the VM was paused.
    loop {
        let batch = take(net, "taking the frames held since the pause")?;
        if batch.is_empty() || t0.elapsed() >= limits.window {
            break;
        }
        report.held += send(link, batch, false, limits, report)?;
    }
    send(link, Vec::new(), true, limits, report)?;
    report.held_sent_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut last = Instant::now();
    while t0.elapsed() < limits.window && last.elapsed() < limits.quiet {
        let batch = take(net, "taking stray frames")?;
        if batch.is_empty() {
            std::thread::sleep(STRAY_POLL);
            continue;
        }
        last = Instant::now();
        report.strays += send(link, batch, false, limits, report)?;
    }
    write_message(
        link,
        &Message::ForwardEnd(ForwardEnd {
            forwarded: report.held + report.strays,
            dropped: report.dropped,
        }),
    )
    .map_err(|source| HandoverError::Link {
        stage: "ending the forwarding",
        source,
    })
}

fn take(net: &mut dyn SourceNetwork, stage: &'static str) -> Result<Vec<Vec<u8>>, HandoverError> {
    net.take_waiting(FRAMES_PER_MESSAGE)
        .map_err(|source| HandoverError::Device { stage, source })
}

/// Sends one batch (what `max_frames` still allows of it); how many frames
/// went.
fn send(
    link: &mut Link,
    mut frames: Vec<Vec<u8>>,
    held_done: bool,
    limits: &ForwardLimits,
    report: &mut ForwardReport,
) -> Result<u64, HandoverError> {
    let sent_so_far = report.held + report.strays;
    let room = limits.max_frames.saturating_sub(sent_so_far) as usize;
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
