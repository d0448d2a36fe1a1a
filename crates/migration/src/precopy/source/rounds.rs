//! Rounds of pages while the VM runs: on the main connection, striped
//! over the page-data streams, or watched by hybrid.

use super::*;

/// Sends one round of pages and its RoundEnd; records it in the report.
pub(super) fn send_round<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut Link,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    blackout: bool,
) -> Result<SentCounts, MigrateError> {
    let stage = if blackout {
        "sending the last pages"
    } else {
        "sending pages"
    };
    let round_bytes: u64 = runs.iter().map(PageRun::bytes).sum();
    let start = RoundStart::now();
    let base = sender.total;
    let phase = if blackout { "blackout" } else { "round" };
    run.tell(phase, round, round_bytes, 0, start.wall, true);
    let mut last_sample = -TIMELINE_EVERY_MS;
    let sent = {
        let mut on_batch = |total: &SentCounts| {
            let in_round = (total.pages - base.pages) * PAGE_SIZE as u64;
            let now_ms = run.ms();
            if now_ms - last_sample >= TIMELINE_EVERY_MS {
                last_sample = now_ms;
                let bytes = run.report.bytes_sent + (total.bytes - base.bytes);
                run.report.timeline.push((now_ms, bytes));
            }
            run.tell(phase, round, round_bytes, in_round, start.wall, false);
        };
        sender
            .send_runs(
                &|gpa, dst| guest.read(gpa, dst),
                stream,
                runs,
                &mut on_batch,
            )
            .map_err(|e| e.at(stage))?
    };
    end_round(stream, run, (round, stage), sent, start, blackout)
}

/// When a round began, on the wall clock and on this thread's CPU clock;
/// `others` is CPU time other threads spent on the round.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoundStart {
    pub(super) wall: Instant,
    pub(super) cpu: Duration,
    pub(super) others: Duration,
}

impl RoundStart {
    pub(super) fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: crate::cpu_clock::thread_cpu_time(),
            others: Duration::ZERO,
        }
    }
}

/// Rounds at least this large go out on the page-data streams, when there
/// are any: below it, starting the threads costs more than they save.
pub(super) const STRIPED_ROUND_MIN_BYTES: u64 = 64 << 20;

/// Asks for `options.streams` page-data streams when that is more than one
/// and the destination speaks a protocol that has them; None otherwise.
pub(super) fn open_streams_if_asked<G: SourceGuest + ?Sized>(
    guest: &G,
    stream: &mut Link,
    options: &MigrateOptions,
    version: u16,
    run: &mut Run<'_>,
) -> Result<Option<Streams>, MigrateError> {
    if options.streams <= 1 || options.mode == Mode::Postcopy {
        return Ok(None);
    }
    if version < STREAMS_VERSION {
        run.say(format!(
            "the destination speaks protocol v{version}, which has one stream only (several need v{STREAMS_VERSION})"
        ));
        return Ok(None);
    }
    let reader = guest.memory_reader().map_err(MigrateError::guest(
        "sharing guest memory with the page-data streams",
    ))?;
    let check = PayloadCheck::for_link(stream.is_tls(), version);
    let streams = open_streams(stream, options.streams, reader, check, options.io_timeout)?;
    match &streams {
        Some(s) => run.report.streams = s.count() as u32,
        None => run.say(
            "the destination cannot take page-data streams (it has no listener); one stream".into(),
        ),
    }
    Ok(streams)
}

/// A round sent on the page-data streams: StripedRound on the main
/// connection, the pages on the streams, then the round's RoundEnd.
pub(super) fn send_round_striped(
    streams: &Streams,
    main: &mut Link,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    tuning: &std::sync::Arc<crate::tuning::Tuning>,
) -> Result<SentCounts, MigrateError> {
    let stage = "sending pages";
    let round_bytes: u64 = runs.iter().map(PageRun::bytes).sum();
    let mut start = RoundStart::now();
    run.tell("round", round, round_bytes, 0, start.wall, true);
    write_message(main, &Message::StripedRound(StripedRound { round }))
        .map_err(MigrateError::protocol(stage))?;
    let mut last_sample = -TIMELINE_EVERY_MS;
    let tick = Duration::from_secs_f64(TIMELINE_EVERY_MS / 1e3);
    let (sent, streams_cpu) = send_striped(streams, round, runs, tuning, tick, &mut |total| {
        let now_ms = run.ms();
        if now_ms - last_sample >= TIMELINE_EVERY_MS {
            last_sample = now_ms;
            let bytes = run.report.bytes_sent + total.bytes;
            run.report.timeline.push((now_ms, bytes));
        }
        let in_round = total.pages * PAGE_SIZE as u64;
        run.tell("round", round, round_bytes, in_round, start.wall, false);
    })?;
    start.others = streams_cpu;
    end_round(main, run, (round, stage), sent, start, false)
}

/// Ends a round that was sent: its RoundEnd with the page count on the
/// main connection, and its row in the totals and the report.
pub(super) fn end_round(
    main: &mut Link,
    run: &mut Run<'_>,
    (round, stage): (u32, &'static str),
    sent: SentCounts,
    start: RoundStart,
    blackout: bool,
) -> Result<SentCounts, MigrateError> {
    let end = RoundEnd {
        round,
        pages: sent.pages,
    };
    write_message(main, &Message::RoundEnd(end)).map_err(MigrateError::protocol(stage))?;
    let duration_ms = start.wall.elapsed().as_secs_f64() * 1e3;
    let cpu = crate::cpu_clock::thread_cpu_time().saturating_sub(start.cpu) + start.others;
    run.report.bytes_sent += sent.bytes;
    run.report.pages_sent += sent.pages;
    run.report.zero_pages += sent.zero_pages;
    let now_ms = run.ms();
    run.report.timeline.push((now_ms, run.report.bytes_sent));
    run.report.rounds.push(RoundReport {
        round,
        pages: sent.pages,
        zero_pages: sent.zero_pages,
        bytes_sent: sent.bytes,
        duration_ms,
        throughput_mibs: mib_per_s(sent.bytes, duration_ms),
        dirty_rate_mibs: 0.0,
        throttle_percent: run.throttle,
        cpu_percent: cpu.as_secs_f64() * 1e3 / duration_ms.max(1e-3) * 100.0,
        blackout,
    });
    Ok(sent)
}

/// Hybrid looks at the guest's dirty rate this often while a round is sent.
pub(super) const WATCH_CHUNK_PAGES: u64 = 4096;
/// ... once the round has run this long (a shorter rate says little).
pub(super) const WATCH_AFTER: Duration = Duration::from_millis(100);

/// How a watched round ended.
pub(super) enum Watched {
    /// Sent whole; the pages the guest dirtied meanwhile (already
    /// harvested, so the next harvest does not report them again).
    Sent(SentCounts, PageBitmap),
    /// The guest outran the link mid-round: post-copy now. `needed` is the
    /// rest of the round and everything dirtied since it began.
    Outrun { needed: PageBitmap, reason: String },
}

/// Hybrid's round: sent in slices, with a look at the dirty log between
/// them, so a guest that dirties more than half of what the link sends is
/// moved by post-copy at once instead of after a whole pass.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_round_watching<G: SourceGuest + ?Sized>(
    guest: &mut G,
    stream: &mut Link,
    sender: &mut PageSender,
    run: &mut Run<'_>,
    round: u32,
    runs: &[PageRun],
    dirty_since: Instant,
) -> Result<Watched, MigrateError> {
    let chunks = split_runs(runs, WATCH_CHUNK_PAGES);
    let start = Instant::now();
    let first_report = run.report.rounds.len();
    let mut seen = PageBitmap::new(&run.ram_ranges);
    let mut total = SentCounts::default();
    let mut outcome = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let sent = send_round(guest, stream, sender, run, round, chunk, false)?;
        total.pages += sent.pages;
        total.zero_pages += sent.zero_pages;
        total.bytes += sent.bytes;
        if i + 1 == chunks.len() || start.elapsed() < WATCH_AFTER || total.bytes < RATE_SAMPLE_MIN {
            continue;
        }
        let stage = "watching the guest's dirty rate";
        seen.union_with(&guest.harvest_dirty().map_err(MigrateError::guest(stage))?);
        let dirty_rate = seen.bytes() as f64 / dirty_since.elapsed().as_secs_f64().max(1e-6);
        let send_rate = total.bytes as f64 / start.elapsed().as_secs_f64().max(1e-6);
        if dirty_rate >= crate::policy::HYBRID_DIRTY_RATIO * send_rate {
            let mut needed = std::mem::replace(&mut seen, PageBitmap::new(&run.ram_ranges));
            for r in chunks[i + 1..].iter().flatten() {
                needed.set_range(r.gpa, r.bytes(), true);
            }
            let mib = |b: f64| b / (1 << 20) as f64;
            outcome = Some(Watched::Outrun {
                needed,
                reason: format!(
                    "in round {round} the guest dirtied {:.0} MiB/s while {:.0} MiB/s were sent: over half",
                    mib(dirty_rate),
                    mib(send_rate)
                ),
            });
            break;
        }
    }
    merge_round_reports(run, first_report);
    Ok(outcome.unwrap_or(Watched::Sent(total, seen)))
}

/// The slices of one watched round as one row of the report.
pub(super) fn merge_round_reports(run: &mut Run<'_>, from: usize) {
    let parts = run.report.rounds.split_off(from);
    let Some(first) = parts.first() else {
        return;
    };
    let mut merged = first.clone();
    for p in &parts[1..] {
        merged.pages += p.pages;
        merged.zero_pages += p.zero_pages;
        merged.bytes_sent += p.bytes_sent;
        merged.duration_ms += p.duration_ms;
    }
    merged.throughput_mibs = mib_per_s(merged.bytes_sent, merged.duration_ms);
    run.report.rounds.push(merged);
}

/// `runs` cut into slices of at most `pages` pages each.
pub(super) fn split_runs(runs: &[PageRun], pages: u64) -> Vec<Vec<PageRun>> {
    let mut out = vec![Vec::new()];
    let mut in_slice = 0u64;
    for r in runs {
        let mut gpa = r.gpa;
        let mut left = u64::from(r.pages);
        while left > 0 {
            if in_slice == pages {
                out.push(Vec::new());
                in_slice = 0;
            }
            let n = left.min(pages - in_slice);
            out.last_mut().expect("never empty").push(PageRun {
                gpa,
                pages: n as u32,
            });
            gpa += n * PAGE_SIZE as u64;
            left -= n;
            in_slice += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_split_into_slices_of_at_most_n_pages() {
        let page = PAGE_SIZE as u64;
        let runs = [
            PageRun { gpa: 0, pages: 5 },
            PageRun {
                gpa: 100 * page,
                pages: 2,
            },
        ];
        let slices = split_runs(&runs, 3);
        let sizes: Vec<u64> = slices
            .iter()
            .map(|s| s.iter().map(|r| u64::from(r.pages)).sum())
            .collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        assert_eq!(
            slices[1][0],
            PageRun {
                gpa: 3 * page,
                pages: 2
            }
        );
        assert_eq!(
            slices[1][1],
            PageRun {
                gpa: 100 * page,
                pages: 1
            }
        );
        assert_eq!(split_runs(&[], 3), vec![Vec::new()]);
    }
}
