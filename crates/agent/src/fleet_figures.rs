//! What the agent measures for the fleet's predictions (plan::predict in
//! the fleet crate): per VM, the guest memory that holds data and the rate
//! the guest writes it; per host, what receiving a VM costs here besides
//! its pages, from this host's own committed incoming migrations.
//!
//! Before the first incoming migration the host reports
//! [`DEFAULT_RECEIVE_SETUP`], measured on this machine (2 cores, nested
//! PVM; see its doc).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_fleet::model::{ReceiveSetup, GIB};
use ferry_fleet::plan::predict::BLACKOUT_MS;

use crate::incoming::{IncomingFile, ReceiveMeasured};
use crate::jobs::{JobFile, SendMeasured};

/// What receiving a VM cost here before anything was measured, from the
/// drains of crates/agent/tests/fleet_drain.rs
/// (`the_dry_runs_predicted_finish...`) on this machine, 2026-12-04: a
/// destination took 0 to 0.75 s per 64 MiB test guest besides its pages
/// and the 2.8 s per GiB below (the receiving `ferry receive` process
/// starting, TLS both ways, the round trips, the commit and the adoption);
/// 0.5 s is the upper middle of that. Memory reserved or first touched
/// costs about 2.8 s per GiB in this nested VM (an earlier session's
/// measurement).
pub const DEFAULT_RECEIVE_SETUP: ReceiveSetup = ReceiveSetup {
    fixed_ms: 500.0,
    per_gib_ms: 2800.0,
    samples: 0,
};

/// What sending a VM cost this host as the source, besides the
/// destination's preparation and the engine, before anything was
/// measured, from the same drains: 0.12 to 0.29 s for a VM leaving
/// alone, 1.3 to 1.6 s each for two leaving at once (the agent and its
/// VMMs share two busy cores); 0.6 s is about their mean over a drain of
/// three VMs two at a time.
pub const DEFAULT_SEND_SETUP_MS: f64 = 600.0;

/// The latest committed incoming migrations the cost is fitted to: recent
/// enough to follow a host whose speed changes.
const SAMPLES: usize = 16;
/// Sizes must spread this much (GiB) before a slope is fitted from them;
/// otherwise the default per-GiB part stands and only the fixed part is
/// measured.
const SPREAD_GIB: f64 = 0.25;

/// The cost of receiving a VM here, fitted to `files` (this host's
/// incoming migrations; those without a measure are skipped). A sample
/// is what a move took beyond its pages over `link_bytes_per_sec` and the
/// blackout: exactly what the fleet's model adds to those two.
pub fn receive_setup(files: &[IncomingFile], link_bytes_per_sec: u64) -> ReceiveSetup {
    receive_setup_of(
        files
            .iter()
            .filter_map(|f| Some((f.offered_at_ms, f.measured?))),
        link_bytes_per_sec,
    )
}

/// [`receive_setup`] of (offered at, measure) pairs.
fn receive_setup_of(
    measures: impl Iterator<Item = (u64, ReceiveMeasured)>,
    link_bytes_per_sec: u64,
) -> ReceiveSetup {
    let mut measured: Vec<(u64, f64, f64)> = measures
        .map(|(at, m)| {
            let pages_ms = m.received_bytes as f64 / link_bytes_per_sec.max(1) as f64 * 1e3;
            let setup = m.total_ms as f64 - pages_ms - BLACKOUT_MS;
            (at, m.mem_bytes as f64 / GIB as f64, setup)
        })
        .collect();
    if measured.is_empty() {
        return DEFAULT_RECEIVE_SETUP;
    }
    measured.sort_by_key(|&(at, _, _)| std::cmp::Reverse(at));
    measured.truncate(SAMPLES);
    fit(&measured.iter().map(|&(_, g, s)| (g, s)).collect::<Vec<_>>())
}

/// What sending a VM costs here besides the destination's part and the
/// engine: the median over this host's latest committed jobs (`files`),
/// [`DEFAULT_SEND_SETUP_MS`] before any.
pub fn send_setup_ms(files: &[JobFile]) -> f64 {
    send_setup_of(
        files
            .iter()
            .filter_map(|f| Some((f.started_at.as_str(), f.measured?))),
    )
}

/// [`send_setup_ms`] of (started at, measure) pairs.
fn send_setup_of<'a>(measures: impl Iterator<Item = (&'a str, SendMeasured)>) -> f64 {
    let mut measured: Vec<(&str, u64)> = measures.map(|(at, m)| (at, m.own_ms())).collect();
    if measured.is_empty() {
        return DEFAULT_SEND_SETUP_MS;
    }
    // RFC 3339 times of one clock sort as text.
    measured.sort_by(|a, b| b.0.cmp(a.0));
    measured.truncate(SAMPLES);
    let mut own: Vec<u64> = measured.into_iter().map(|(_, ms)| ms).collect();
    own.sort_unstable();
    own[own.len() / 2] as f64
}

/// A line through (GiB, setup ms) points, its slope and intercept kept
/// non-negative.
fn fit(points: &[(f64, f64)]) -> ReceiveSetup {
    let n = points.len() as f64;
    let samples = points.len() as u32;
    let (lo, hi) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &(g, _)| {
            (lo.min(g), hi.max(g))
        });
    let mean_g = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_s = points.iter().map(|p| p.1).sum::<f64>() / n;
    if hi - lo >= SPREAD_GIB {
        let sxx: f64 = points.iter().map(|p| (p.0 - mean_g).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mean_g) * (p.1 - mean_s)).sum();
        let slope = (sxy / sxx).max(0.0);
        let fixed = mean_s - slope * mean_g;
        if fixed >= 0.0 {
            return ReceiveSetup {
                fixed_ms: fixed,
                per_gib_ms: slope,
                samples,
            };
        }
        // Through the origin: all of it grows with the size.
        let sgg: f64 = points.iter().map(|p| p.0 * p.0).sum();
        let sgs: f64 = points.iter().map(|p| p.0 * p.1).sum();
        return ReceiveSetup {
            fixed_ms: 0.0,
            per_gib_ms: (sgs / sgg).max(0.0),
            samples,
        };
    }
    let per_gib = DEFAULT_RECEIVE_SETUP.per_gib_ms;
    ReceiveSetup {
        fixed_ms: (mean_s - per_gib * mean_g).max(0.0),
        per_gib_ms: per_gib,
        samples,
    }
}

/// The guest memory process `pid` holds: the resident pages of its
/// memfd-backed guest memory (each memfd counted once, however often it
/// is mapped). Pages never written are not resident, and a pre-copy skips
/// them, so this is what a first pass sends. None when /proc says nothing.
pub fn populated_bytes(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut per_inode: HashMap<u64, u64> = HashMap::new();
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range perms offset dev inode [path].
            let fields: Vec<&str> = line.split_whitespace().collect();
            current = (fields.len() >= 6 && fields[5].starts_with("/memfd:ferry-guest-ram"))
                .then(|| fields[4].parse().ok())
                .flatten();
        } else if let (Some(inode), Some(kb)) = (current, line.strip_prefix("Rss:")) {
            let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            let e = per_inode.entry(inode).or_insert(0);
            *e = (*e).max(kb * 1024);
        }
    }
    (!per_inode.is_empty()).then(|| per_inode.values().sum())
}

/// How long the member waits for a VMM's Status answer: it must never
/// hold up the lease it keeps alive.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// The guest's count of pages written so far, from its VMM's latest
/// heartbeat; None if the VMM does not answer quickly.
fn pages_written(socket: &Path) -> Option<u64> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(STATUS_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(STATUS_TIMEOUT)).ok()?;
    let mut text = serde_json::to_string(&ferry_control::Request::Status).ok()?;
    text.push('\n');
    stream.write_all(text.as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    match serde_json::from_str(line.trim()).ok()? {
        ferry_control::Response::Status { guest, .. } => guest.map(|g| g.wr),
        _ => None,
    }
}

/// Each VM's write rate, from the guest's written-pages counter read a
/// few seconds apart. Every page written counts: a page rewritten twice
/// between two rounds of a pre-copy is sent once, so this bounds the dirty
/// rate from above (the cautious side for a prediction).
#[derive(Debug, Default)]
pub struct DirtyMeter {
    last: HashMap<String, (u64, Instant)>,
    rate: HashMap<String, u64>,
}

/// Readings closer than this are too noisy for a rate (heartbeats come
/// every 100 ms).
const MIN_SPAN: Duration = Duration::from_millis(900);

impl DirtyMeter {
    /// Reads `vm`'s counter now and returns its rate in bytes per second,
    /// the last one known if this reading gives none yet.
    pub fn sample(&mut self, vm: &str, socket: &Path) -> Option<u64> {
        if let Some(wr) = pages_written(socket) {
            let now = Instant::now();
            match self.last.get(vm) {
                Some(&(before, at)) if wr >= before && now - at >= MIN_SPAN => {
                    let rate = (wr - before) as f64 * 4096.0 / (now - at).as_secs_f64();
                    self.rate.insert(vm.to_string(), rate as u64);
                    self.last.insert(vm.to_string(), (wr, now));
                }
                Some(&(before, _)) if wr >= before => {}
                // First reading, or the counter went back (a new VMM).
                _ => {
                    self.last.insert(vm.to_string(), (wr, now));
                }
            }
        }
        self.rate.get(vm).copied()
    }

    /// Forgets VMs no longer here.
    pub fn keep(&mut self, here: &[&str]) {
        self.last.retain(|vm, _| here.contains(&vm.as_str()));
        self.rate.retain(|vm, _| here.contains(&vm.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_size_measures_the_fixed_part_and_keeps_the_default_slope() {
        let s = fit(&[(0.0625, 1000.0), (0.0625, 1200.0)]);
        assert_eq!(s.per_gib_ms, DEFAULT_RECEIVE_SETUP.per_gib_ms);
        assert!(
            (s.fixed_ms - (1100.0 - 2800.0 * 0.0625)).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!(s.samples, 2);
    }

    #[test]
    fn sizes_that_spread_fit_a_line() {
        // 400 ms + 3 s/GiB, measured at 0.25, 1 and 2 GiB.
        let s = fit(&[(0.25, 1150.0), (1.0, 3400.0), (2.0, 6400.0)]);
        assert!((s.fixed_ms - 400.0).abs() < 1.0, "{s:?}");
        assert!((s.per_gib_ms - 3000.0).abs() < 1.0, "{s:?}");
        // A line through negative values is pulled through the origin.
        let s = fit(&[(0.5, 100.0), (2.0, 4000.0)]);
        assert_eq!(s.fixed_ms, 0.0);
        assert!(s.per_gib_ms > 0.0, "{s:?}");
    }

    #[test]
    fn the_default_stands_until_something_was_measured() {
        assert_eq!(receive_setup(&[], 1_250_000_000), DEFAULT_RECEIVE_SETUP);
        assert_eq!(send_setup_ms(&[]), DEFAULT_SEND_SETUP_MS);
    }

    #[test]
    fn a_receive_is_charged_what_it_took_beyond_its_pages_and_blackout() {
        let link = 1_250_000_000;
        let m = |total_ms| ReceiveMeasured {
            mem_bytes: 64 << 20,
            prepare_ms: 30,
            total_ms,
            // 12.5 MB: 10 ms on the link.
            received_bytes: 12_500_000,
        };
        let s = receive_setup_of([(1, m(612)), (2, m(812))].into_iter(), link);
        // (600 + 800) / 2 - 2800 * 1/16 GiB; 10 ms of pages, 2 of blackout.
        let want = 700.0 - 2800.0 / 16.0;
        assert!((s.fixed_ms - want).abs() < 1e-6, "{s:?}");
        assert_eq!(s.samples, 2);
        // Only the latest SAMPLES count.
        let many = (0..40u64).map(|i| (i, m(if i < 24 { 100_000 } else { 612 })));
        let s = receive_setup_of(many, link);
        assert_eq!(s.samples, SAMPLES as u32);
        assert!((s.fixed_ms - (600.0 - 175.0)).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn a_send_is_charged_the_median_of_what_the_job_spent_itself() {
        let m = |total_ms| SendMeasured {
            total_ms,
            prepare_call_ms: 100,
            engine_ms: 50,
        };
        assert_eq!(m(1000).own_ms(), 850);
        assert_eq!(m(10).own_ms(), 0);
        let s = send_setup_of(
            [
                ("2026-12-04T10:00:00.000Z", m(400)),
                ("2026-12-04T10:00:01.000Z", m(5000)),
                ("2026-12-04T10:00:02.000Z", m(450)),
            ]
            .into_iter(),
        );
        assert_eq!(s, 300.0);
    }

    #[test]
    fn this_process_has_no_guest_memory() {
        assert_eq!(populated_bytes(std::process::id()), None);
    }
}
