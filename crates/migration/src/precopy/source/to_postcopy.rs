//! Moving the VM before its memory: the switch to post-copy, and trying a
//! given-up post-copy again.

use super::*;

/// Tries again a post-copy given up on (`Failure::resume`): reconnects to
/// the destination, learns which pages it holds, sends the rest. On
/// failure the `Failure` carries the same post-copy, to try again later.
pub fn resume_postcopy(
    unfinished: Box<Unfinished>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, Failure> {
    let t0 = Instant::now();
    let needed = unfinished.needed_pages();
    let mut report = MigrationReport {
        mode: "postcopy (resumed)".into(),
        destination: unfinished.destination().to_string(),
        ..Default::default()
    };
    let mut events = |event: ServeEvent| {
        let p = match event {
            ServeEvent::Progress(sent, total) => Progress {
                phase: "postcopy".into(),
                round_bytes: total * PAGE_SIZE as u64,
                remaining_bytes: total.saturating_sub(sent) * PAGE_SIZE as u64,
                elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            },
            ServeEvent::Note(text) => Progress {
                phase: "note".into(),
                message: Some(text),
                elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            },
        };
        progress(&p);
    };
    // The guest runs on the destination and waits on these pages.
    let _serving = crate::thread_priority::Serving::start();
    match crate::postcopy::source::resume(unfinished, &mut events) {
        Ok(mut served) => {
            report.outcome = "committed".into();
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            report.bytes_sent = served.bytes;
            report.pages_sent = served.pushed_pages + served.requested_pages;
            report.throughput_mibs = mib_per_s(served.bytes, report.total_ms);
            // The link that failed before the operator's word counts too.
            served.recoveries += 1;
            report.postcopy =
                Some(served.report("resumed by the operator", needed, report.total_ms));
            Ok(report)
        }
        Err((error, unfinished)) => {
            report.outcome =
                "post-copy interrupted: the VM waits on the destination for pages held here".into();
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            Err(Failure {
                error,
                vm_running: false,
                resume: Some(unfinished),
                report: Box::new(report),
            })
        }
    }
}

/// Moves the VM before the rest of its memory: opens the fault channel,
/// pauses, tells the destination which pages it lacks (`dirty`: those
/// dirtied since they were sent; None: nothing was sent, so every page
/// that may hold data), hands the state over and commits, then serves
/// pages until the destination holds them all.
#[allow(clippy::too_many_arguments)]
pub(super) fn switch_to_postcopy<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
    options: &MigrateOptions,
    run: &mut Run<'_>,
    dirty: Option<PageBitmap>,
    predicted: Duration,
    reason: &str,
) -> Result<(), MigrateError> {
    seal(options, crate::cancel::Sealed::Postcopy)?;
    let session = new_session();
    let fault = open_fault_channel(stream, session, options.io_timeout)?;

    let boost = crate::thread_priority::Boost::start();
    run.report.blackout.priority = boost.level.describe();
    let paused = guest
        .pause()
        .map_err(MigrateError::guest("pausing the VM"))?;
    let woke = Instant::now();
    run.paused = true;
    run.throttle = 0;
    let needed = match dirty {
        Some(mut dirty) => {
            let last = guest
                .harvest_dirty()
                .map_err(MigrateError::guest("harvesting the last dirty pages"))?;
            dirty.union_with(&last);
            dirty
        }
        None => {
            let mut all = PageBitmap::new(&run.ram_ranges);
            for r in guest
                .populated()
                .map_err(MigrateError::guest("finding the populated memory"))?
            {
                all.set_range(r.gpa, r.len, true);
            }
            all
        }
    };
    let stage = "telling the destination which pages it lacks";
    write_message(
        stream,
        &Message::PostcopyBegin(PostcopyBegin {
            pages: needed.count(),
            words: needed.to_words(),
        }),
    )
    .map_err(MigrateError::protocol(stage))?;
    // No Prepare: after a post-copy commit a broken link is the post-copy's
    // to recover (Resume), and before it the source keeps the VM.
    let pages_sent = Instant::now();
    let handed = hand_over(guest, stream, run, None)?;
    drop(boost);
    run.postcopy_started = true;
    // Committed: the frames held since the pause, and strays, follow the
    // VM between the pages (a destination older than v11 takes none).
    let mut net = if crate::handover::forwards_during_postcopy(run.version) {
        guest.network_after_commit()
    } else {
        None
    };
    let mut forwarder = net
        .as_deref_mut()
        .map(|n| Forwarder::new(n, ForwardLimits::default()));
    // The post-copy destination reports no share of its own: the downtime
    // is the upper bound, up to Committed. ("last pages" here is the set of
    // pages the destination lacks.)
    let clock = BlackoutClock {
        paused,
        woke,
        pages_sent,
        handed,
    };
    let b = &mut run.report.blackout;
    clock.fill(b, None);
    b.predicted_ms = predicted.as_secs_f64() * 1e3;
    b.prediction = "the state and the set of missing pages, at the measured rate".into();

    let memory = guest
        .memory_reader()
        .map_err(MigrateError::guest("sharing the paused VM's memory"))?;
    let t_serve = Instant::now();
    let serve_options = ServeOptions {
        tuning: options
            .tuning
            .clone()
            .unwrap_or_else(|| std::sync::Arc::new(crate::tuning::Tuning::new(options.bandwidth))),
        io_timeout: options.io_timeout,
        recovery: options.link_recovery,
        session,
        dialer: stream.dialer(),
    };
    let needed_bytes = needed.bytes();
    // The guest now runs on the destination and waits on these pages.
    let serving = crate::thread_priority::Serving::start();
    let served = serve(
        memory,
        stream,
        fault,
        &needed,
        &serve_options,
        forwarder.as_mut(),
        &mut |event: ServeEvent| match event {
            ServeEvent::Progress(sent, total) => {
                let left = total.saturating_sub(sent) * PAGE_SIZE as u64;
                run.tell(
                    "postcopy",
                    0,
                    needed_bytes,
                    needed_bytes - left,
                    t_serve,
                    true,
                );
            }
            ServeEvent::Note(text) => run.say(text),
        },
    );
    drop(serving);
    if let Some(f) = forwarder.as_mut().filter(|_| served.is_ok()) {
        // The pages are all there; the window for strays may not be over.
        f.run_to_end(stream);
    }
    run.report.network = forwarder.map(Forwarder::finish);
    let served = match served {
        Ok(served) => served,
        Err(failure) => {
            run.unfinished = failure.unfinished;
            return Err(failure.error);
        }
    };
    let duration_ms = t_serve.elapsed().as_secs_f64() * 1e3;
    run.report.postcopy = Some(served.report(reason, needed.count(), duration_ms));
    run.report.bytes_sent += served.bytes;
    run.report.pages_sent += served.pushed_pages + served.requested_pages;
    run.report.total_ms = run.ms();
    let now_ms = run.ms();
    run.report.timeline.push((now_ms, run.report.bytes_sent));
    run.report.throughput_mibs = mib_per_s(
        run.report.bytes_sent,
        run.report.total_ms - run.report.setup_ms,
    );
    Ok(())
}
