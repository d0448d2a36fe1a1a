//! Auto mode's start: measure the link and the guest, predict each mode,
//! choose.

use super::*;

/// How long auto mode watches the guest's writes before it chooses: a
/// first look, and the whole sample for a guest that is not quiet.
pub(super) const AUTO_QUICK_SAMPLE: Duration = Duration::from_millis(20);
pub(super) const AUTO_SAMPLE: Duration = Duration::from_millis(100);
/// Auto mode measures the link with the first pages of the first pass.
pub(super) const PROBE_PAGES: u64 = 4096;
/// Below this, a probe says more about latency than about the link.
pub(super) const PROBE_MIN_BYTES: u64 = 4 << 20;

/// What auto mode decided, and where the migration goes on from.
pub(super) struct AutoStart {
    pub(super) mode: Mode,
    /// Pages the destination does not hold current: the rest of the first
    /// pass, and what the guest dirtied since the probe began.
    pub(super) unsent: PageBitmap,
    /// When the dirty log was last harvested.
    pub(super) harvested: Instant,
}

/// Auto mode: sends the start of the first pass to measure the link (the
/// cap holds there too), samples the guest's dirty rate meanwhile,
/// predicts each mode and picks one; says so, and keeps the prediction for
/// the report. Nothing is wasted: those pages are the first pass's.
pub(super) fn choose_mode<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
    sender: &mut PageSender,
    options: &MigrateOptions,
    run: &mut Run<'_>,
) -> Result<AutoStart, MigrateError> {
    let stage = "sampling the guest and the link";
    guest
        .set_dirty_logging(true)
        .map_err(MigrateError::guest(stage))?;
    // Logging may start with every page marked: clear that first.
    guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
    let t = Instant::now();
    let populated = guest.populated().map_err(MigrateError::guest(stage))?;
    let populated_bytes: u64 = populated.iter().map(|r| r.len).sum();
    let mut slices = split_runs(&ranges_to_runs(&populated), PROBE_PAGES).into_iter();
    let probe = slices.next().unwrap_or_default();
    let t_probe = Instant::now();
    let sent = send_round(guest, stream, sender, run, 1, &probe, false)?;
    let probe_time = t_probe.elapsed();
    let (link_rate, link_rate_measured) = if sent.bytes >= PROBE_MIN_BYTES {
        (sent.bytes as f64 / probe_time.as_secs_f64().max(1e-6), true)
    } else {
        (options.bandwidth.map_or(ASSUMED_RATE, |b| b as f64), false)
    };
    // A short look settles a quiet guest; a busy one is watched longer,
    // for a steadier rate.
    std::thread::sleep(AUTO_QUICK_SAMPLE.saturating_sub(t.elapsed()));
    let mut dirty = guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
    let quiet = (dirty.bytes() as f64 / t.elapsed().as_secs_f64().max(1e-6)) < 0.05 * link_rate;
    if !quiet {
        std::thread::sleep(AUTO_SAMPLE.saturating_sub(t.elapsed()));
        let more = guest.harvest_dirty().map_err(MigrateError::guest(stage))?;
        dirty.union_with(&more);
    }
    let harvested = Instant::now();
    let sample = t.elapsed();
    let facts = crate::auto::AutoFacts {
        populated_bytes,
        dirty_rate: dirty.bytes() as f64 / sample.as_secs_f64().max(1e-6),
        link_rate,
        link_rate_measured,
        sample,
        downtime_target: options.policy.downtime_target,
        fixed_blackout: options.policy.fixed_blackout,
        // A copied disk moves by pre-copy only.
        allow_postcopy: options.policy.allow_postcopy && !run.copies_disks,
    };
    let (mode, prediction) = crate::auto::choose(&facts);
    let modes: Vec<String> = prediction
        .modes
        .iter()
        .map(|m| {
            format!(
                "{} {:.0} ms (blackout {:.0} ms)",
                m.mode, m.total_ms, m.blackout_ms
            )
        })
        .collect();
    run.say(format!(
        "auto: {:.0} MiB may hold data, guest dirties {:.0} MiB/s, link {:.0} MiB/s ({}); predicted {}; chose {}: {}",
        prediction.populated_mib,
        prediction.dirty_rate_mibs,
        prediction.link_rate_mibs,
        if link_rate_measured {
            "measured on the first pages"
        } else if options.bandwidth.is_some() {
            "the cap"
        } else {
            "assumed: too little to measure"
        },
        modes.join(", "),
        prediction.chosen,
        prediction.why
    ));
    run.report.mode = format!("auto: {}", mode.name());
    run.report.prediction = Some(prediction);
    let mut unsent = dirty;
    for r in slices.flatten() {
        unsent.set_range(r.gpa, r.bytes(), true);
    }
    Ok(AutoStart {
        mode,
        unsent,
        harvested,
    })
}
