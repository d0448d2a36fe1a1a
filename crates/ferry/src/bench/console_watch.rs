//! What a guest console says about a migration, for both sides of the
//! bench: heartbeats read off a child's stdout with their arrival times,
//! and the baseline's verdict (sequence continues, counters never go
//! back, no page error, a whole working set verified after the move, the
//! longest stall over the first heartbeats on the destination).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, DiskCounters, Exit, Heartbeat, Line, Ready};

/// Verify the working set within this long after the move.
pub(crate) const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest-seen stall is the largest over this many destination heartbeats.
pub(crate) const STALL_HEARTBEATS: usize = 5;
pub(crate) const MIN_DST_HEARTBEATS: usize = 5;
pub(crate) const TAIL_LINES: usize = 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Enough destination heartbeats to judge, and (with a working set) a
/// whole working set rewritten, so verified, since the first of them.
pub(crate) fn dst_done(heartbeats: &[(Instant, Heartbeat)], ws_pages: u64) -> bool {
    heartbeats.len() >= MIN_DST_HEARTBEATS
        && (ws_pages == 0 || sweeps_since_first(heartbeats, ws_pages) >= 1)
}

pub(crate) fn sweeps_since_first(heartbeats: &[(Instant, Heartbeat)], ws_pages: u64) -> u64 {
    match (heartbeats.first(), heartbeats.last()) {
        (Some((_, first)), Some((_, last))) if ws_pages > 0 => {
            last.wr.saturating_sub(first.wr) / ws_pages
        }
        _ => 0,
    }
}

pub(crate) struct Verdict {
    pub(crate) guest_stall_ms: f64,
    pub(crate) host_gap_ms: f64,
    pub(crate) last_src_seq: Option<u64>,
    pub(crate) first_dst_seq: Option<u64>,
    pub(crate) dst_sweeps_verified: u64,
    pub(crate) errors: u64,
    pub(crate) failures: Vec<String>,
}

/// Blocks of its disk the guest read back and checked since its first
/// heartbeat here.
pub(crate) fn disk_checked(state: &ConsoleState) -> u64 {
    match (state.disk.first(), state.disk.last()) {
        (Some(f), Some(l)) => l.disk_ver.saturating_sub(f.disk_ver),
        _ => 0,
    }
}

/// What is wrong with the destination's disk: bad blocks, or fewer than a
/// whole round of `round` blocks checked.
pub(crate) fn disk_failures(dst: &ConsoleState, round: u64) -> Vec<String> {
    let mut failures = Vec::new();
    let errors = dst.disk.iter().map(|d| d.disk_err).max().unwrap_or(0);
    if errors > 0 {
        failures.push(format!(
            "the destination guest found {errors} bad disk blocks"
        ));
    }
    let checked = disk_checked(dst);
    if checked < round {
        failures.push(format!(
            "the destination guest checked {checked} disk blocks, not a whole round of {round}"
        ));
    }
    failures
}

/// The checks of the baseline's `heartbeat_continued` and
/// `dst_full_sweep_verified`, on what both consoles printed.
pub(crate) fn judge(
    src: &ConsoleState,
    dst: &ConsoleState,
    dst_status: &str,
    ws_pages: u64,
) -> Verdict {
    let mut failures = Vec::new();
    let last_src = src.heartbeats.last();
    let first_dst = dst.heartbeats.first();
    let errors = src
        .heartbeats
        .iter()
        .chain(&dst.heartbeats)
        .map(|(_, hb)| hb.err)
        .chain([src.page_errors, dst.page_errors])
        .max()
        .unwrap_or(0);

    if dst_status != "running" {
        failures.push(format!("destination status is {dst_status}, not running"));
    }
    if let Some(exit) = &dst.exit {
        failures.push(format!(
            "destination guest stopped: EXIT code={} reason={}",
            exit.code, exit.reason
        ));
    }
    if errors > 0 {
        failures.push(format!("{errors} pages failed verification"));
    }
    if dst.heartbeats.len() < MIN_DST_HEARTBEATS {
        failures.push(format!(
            "{} destination heartbeats, want at least {MIN_DST_HEARTBEATS}",
            dst.heartbeats.len()
        ));
    }
    match (last_src, first_dst) {
        (Some((_, s)), Some((_, d))) => {
            // A heartbeat line the switchover cut in two reaches neither
            // console whole (head on the source, tail on the destination),
            // so one number is skipped; the tail shows as a garbled line.
            let skipped_ok = dst.other_before_first_hb && d.seq == s.seq + 2;
            if d.seq != s.seq + 1 && !skipped_ok {
                failures.push(format!(
                    "destination heartbeats start at seq={} after the source's seq={}",
                    d.seq, s.seq
                ));
            }
            if d.wr < s.wr {
                failures.push(format!("write counter went back: {} -> {}", s.wr, d.wr));
            }
        }
        (None, _) => failures.push("no source heartbeat".into()),
        (_, None) => failures.push("no destination heartbeat".into()),
    }
    for pair in dst.heartbeats.windows(2) {
        let (a, b) = (&pair[0].1, &pair[1].1);
        if b.seq != a.seq + 1 || b.wr < a.wr {
            failures.push(format!(
                "destination heartbeats jump: seq={} wr={} then seq={} wr={}",
                a.seq, a.wr, b.seq, b.wr
            ));
            break;
        }
    }
    let dst_sweeps_verified = sweeps_since_first(&dst.heartbeats, ws_pages);
    if ws_pages > 0 && dst_sweeps_verified == 0 {
        failures.push(format!(
            "the working set ({ws_pages} pages) was not verified in full within {VERIFY_TIMEOUT:?} after the move"
        ));
    }
    let guest_stall_ms = dst
        .heartbeats
        .iter()
        .take(STALL_HEARTBEATS)
        .map(|(_, hb)| hb.stall_us as f64 / 1e3)
        .reduce(f64::max)
        .unwrap_or(f64::NAN);
    let host_gap_ms = match (last_src, first_dst) {
        (Some((s, _)), Some((d, _))) => ms(d.saturating_duration_since(*s)),
        _ => f64::NAN,
    };
    Verdict {
        guest_stall_ms,
        host_gap_ms,
        last_src_seq: last_src.map(|(_, hb)| hb.seq),
        first_dst_seq: first_dst.map(|(_, hb)| hb.seq),
        dst_sweeps_verified,
        errors,
        failures,
    }
}

/// What a guest console printed, as the reader thread saw it.
pub(crate) struct Console {
    pub(crate) state: Mutex<ConsoleState>,
    pub(crate) changed: Condvar,
}

#[derive(Default)]
pub(crate) struct ConsoleState {
    /// With the host time each line arrived.
    pub(crate) heartbeats: Vec<(Instant, Heartbeat)>,
    /// The disk counters of the heartbeats that carry them (a guest with a
    /// disk workload).
    pub(crate) disk: Vec<DiskCounters>,
    pub(crate) ready: Option<(Instant, Ready)>,
    pub(crate) exit: Option<Exit>,
    /// `ERR` lines.
    pub(crate) page_errors: u64,
    /// An unparsed line came before the first heartbeat: on the
    /// destination, the tail of a heartbeat the switchover cut.
    pub(crate) other_before_first_hb: bool,
    pub(crate) tail: VecDeque<String>,
    pub(crate) closed: bool,
}

impl ConsoleState {
    pub(crate) fn clone_for_verdict(&self) -> ConsoleState {
        ConsoleState {
            heartbeats: self.heartbeats.clone(),
            disk: self.disk.clone(),
            ready: self.ready.clone(),
            exit: self.exit.clone(),
            page_errors: self.page_errors,
            other_before_first_hb: self.other_before_first_hb,
            tail: VecDeque::new(),
            closed: self.closed,
        }
    }

    pub(crate) fn add(&mut self, text: &str, at: Instant) {
        let line = text.trim_end_matches(['\n', '\r']);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
        match parse_line(line) {
            Line::Heartbeat(hb) => {
                if let Some(d) = DiskCounters::from_heartbeat(line) {
                    self.disk.push(d);
                }
                self.heartbeats.push((at, hb));
            }
            Line::Ready(r) => self.ready = Some((at, r)),
            Line::Exit(e) => self.exit = Some(e),
            Line::PageError(_) => self.page_errors += 1,
            Line::Other(_) if self.heartbeats.is_empty() => self.other_before_first_hb = true,
            Line::Boot(_) | Line::Other(_) => {}
        }
    }
}

impl Console {
    pub(crate) fn spawn_reader(
        role: impl std::fmt::Display + Send + 'static,
        stdout: impl Read + Send + 'static,
    ) -> Arc<Console> {
        let console = Arc::new(Console {
            state: Mutex::new(ConsoleState::default()),
            changed: Condvar::new(),
        });
        let shared = Arc::clone(&console);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf);
                tracing::trace!(role = %role, line = %text.trim_end(), "console");
                let mut state = shared.lock();
                if buf.ends_with(b"\n") {
                    state.add(&text, at);
                } else {
                    // Cut off by QEMU's exit: for the tail only, a
                    // truncated heartbeat would still parse.
                    state.tail.push_back(format!("{} (partial line)", text));
                }
                shared.changed.notify_all();
            }
            shared.lock().closed = true;
            shared.changed.notify_all();
        });
        console
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        lock(&self.state)
    }

    /// Waits until `done`, the end of the console (QEMU exited) or the
    /// deadline, whichever comes first.
    pub(crate) fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&ConsoleState) -> bool,
    ) -> MutexGuard<'_, ConsoleState> {
        let mut state = self.lock();
        while !done(&state) && !state.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state
    }

    pub(crate) fn tail(&self) -> String {
        let state = self.lock();
        if state.tail.is_empty() {
            return "(nothing)".into();
        }
        state.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A reader thread cannot leave the state half-updated, so a poisoned lock
/// is still good to read.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
