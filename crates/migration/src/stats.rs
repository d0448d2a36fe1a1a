//! What a migration measured: live progress while it runs and the report
//! at the end (for a table and for `--json`).

use serde::{Deserialize, Serialize};

/// A snapshot of a running migration, for a progress bar.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// "setup", "round", "blackout", "committed".
    pub phase: String,
    pub round: u32,
    /// Bytes still to send in this round.
    pub remaining_bytes: u64,
    /// Bytes to send in this round in all.
    pub round_bytes: u64,
    pub sent_bytes: u64,
    /// The guest's dirty rate measured at the last harvest.
    pub dirty_rate_mibs: f64,
    /// Send rate over the current round.
    pub throughput_mibs: f64,
    pub throttle_percent: u32,
    pub elapsed_ms: f64,
    /// Time left in this round at the current rate.
    pub eta_ms: Option<f64>,
    /// Something to tell the operator once (auto mode's prediction).
    #[serde(default)]
    pub message: Option<String>,
}

/// One round of pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundReport {
    pub round: u32,
    /// Pages sent (data and zero) and how many were zero (no payload).
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    pub throughput_mibs: f64,
    /// Dirty rate measured at the harvest that ended this round.
    pub dirty_rate_mibs: f64,
    /// Throttle in force while this round was sent.
    pub throttle_percent: u32,
    /// CPU time the source's migration threads got during the round, in
    /// percent of one core (several streams can take more than one).
    #[serde(default)]
    pub cpu_percent: f64,
    /// True for the pages sent while the VM was paused.
    pub blackout: bool,
}

/// The blackout: from the moment the last vCPU stopped running guest code
/// on the source to the moment the first vCPU ran guest code on the
/// destination. Its parts add up to it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlackoutReport {
    /// The host-side downtime. Exact (to within half the commit's round
    /// trip on the link) when `exact`; otherwise an upper bound: from the
    /// last vCPU stop to `Committed` received, for a destination that does
    /// not report its own share (protocol v4 and older, post-copy).
    pub host_downtime_ms: f64,
    pub exact: bool,
    /// How far `host_downtime_ms` can be off either way. The commit's trip
    /// to the destination is not seen by either clock: it is taken as half
    /// of the time the commit's round trip spent outside the destination,
    /// so it lies between none and twice that. Zero without the
    /// destination's share (then the figure is an upper bound).
    #[serde(default)]
    pub uncertainty_ms: f64,
    /// The parts, in order; they add up to `host_downtime_ms`.
    pub parts: Vec<BlackoutPart>,
    /// What the switchover decision expected, and how.
    pub predicted_ms: f64,
    pub prediction: String,
    /// Whether the switchover was forced (round limit or brake exhausted)
    /// rather than chosen because the prediction fit the target.
    pub forced: bool,
    /// From asking the vCPUs to stop to the last one stopping: before the
    /// blackout (the guest still ran), but part of what a pause costs.
    /// Zero when the brake had parked them all already.
    pub stop_vcpus_ms: f64,
    /// The scheduling the blackout's thread got here.
    pub priority: String,
    pub final_pages: u64,
    pub final_bytes: u64,
    pub state_bytes: u64,
    /// Whether `host_downtime_ms` kept the downtime target; None before a
    /// blackout.
    pub target_met: Option<bool>,
    /// Present when the target was missed: the part that missed it most.
    pub missed_by: Option<String>,
    /// Present when the first Committed never came and the destination
    /// confirmed the commit on a new connection: what went wrong, and how
    /// long confirming took.
    #[serde(default)]
    pub commit_recovered: Option<String>,
}

/// One named stretch of the blackout.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlackoutPart {
    pub name: String,
    pub ms: f64,
}

impl BlackoutReport {
    pub fn part(&self, name: &str) -> Option<f64> {
        self.parts.iter().find(|p| p.name == name).map(|p| p.ms)
    }

    /// "pause 0.01 ms, last pages 1.20 ms, ..." for a one-line report.
    pub fn parts_line(&self) -> String {
        self.parts
            .iter()
            .map(|p| format!("{} {:.2} ms", p.name, p.ms))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Judges the downtime against `target_ms`. The part that missed it is
    /// the one that overran its share of the prediction the most: the last
    /// pages against bytes over rate, the rest against the fixed costs; or
    /// the decision itself, when the switchover was forced with a
    /// prediction already over the target.
    pub fn judge(&mut self, target_ms: f64, predicted_pages_ms: f64) {
        let met = self.host_downtime_ms <= target_ms;
        self.target_met = Some(met);
        self.missed_by = None;
        if met {
            return;
        }
        if self.forced && self.predicted_ms > target_ms {
            self.missed_by = Some(format!(
                "the switchover: forced (round limit or brake exhausted) with {:.2} ms predicted",
                self.predicted_ms
            ));
            return;
        }
        let predicted_fixed = (self.predicted_ms - predicted_pages_ms).max(0.0);
        let is_pages = |name: &str| name == PART_LAST_PAGES || name == PART_LAST_PAGES_ARRIVING;
        let pages: f64 = self
            .parts
            .iter()
            .filter(|p| is_pages(&p.name))
            .map(|p| p.ms)
            .sum();
        let others = || self.parts.iter().filter(|p| !is_pages(&p.name));
        let fixed: f64 = others().map(|p| p.ms).sum();
        let worst_fixed = others().max_by(|a, b| a.ms.total_cmp(&b.ms));
        self.missed_by = Some(match worst_fixed {
            Some(w) if fixed - predicted_fixed > pages - predicted_pages_ms => format!(
                "{}: {:.2} ms, of {fixed:.2} ms of fixed costs against {predicted_fixed:.2} ms predicted",
                w.name, w.ms
            ),
            _ => format!(
                "{PART_LAST_PAGES}: {pages:.2} ms against {predicted_pages_ms:.2} ms predicted ({} pages)",
                self.final_pages
            ),
        });
    }
}

/// The parts' names, shared by the engine, the report and the tests.
pub const PART_WAKE: &str = "wake";
/// Harvesting the last dirty pages and writing them into the socket.
pub const PART_LAST_PAGES: &str = "last pages";
/// The last pages still on their way to the destination after the state
/// was saved (v5 destinations measure it).
pub const PART_LAST_PAGES_ARRIVING: &str = "last pages arriving";
pub const PART_STATE_SAVE: &str = "state save";
/// A VM with a disk: its last requests done, flushed if the image goes
/// through the page cache, and its lock given up for the destination.
pub const PART_STORAGE: &str = "disk flush + unlock";
/// Sending the state, loading it there and the answer's way back (with a
/// destination that cannot tell, also the last pages' arrival).
pub const PART_STATE_TO_DESTINATION: &str = "state to destination";
pub const PART_COMMIT: &str = "commit";
pub const PART_RESUME: &str = "resume";
pub const PART_COMMIT_ROUND_TRIP: &str = "commit round trip";

/// What the guest itself saw, reported by the destination after it ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestSeen {
    /// The longest stall the guest measured across the switchover.
    pub stall_ms: Option<f64>,
    pub first_seq: Option<u64>,
}

/// What auto mode measured and expected of each mode before choosing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    pub sample_ms: f64,
    pub dirty_rate_mibs: f64,
    /// The cap, or the rate assumed for an uncapped link.
    pub link_rate_mibs: f64,
    pub link_rate_measured: bool,
    pub populated_mib: f64,
    pub modes: Vec<ModePrediction>,
    pub chosen: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModePrediction {
    pub mode: String,
    pub total_ms: f64,
    pub blackout_ms: f64,
    /// None when the mode is expected to finish without help; otherwise
    /// what it costs the guest (a brake, or faults while memory follows).
    pub guest_cost: String,
}

/// The post-copy phase: from the VM's start on the destination until its
/// last page arrived there.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PostcopyReport {
    /// Why post-copy started: asked for, or what hybrid saw.
    pub reason: String,
    /// Pages the destination lacked when the VM started there.
    pub needed_pages: u64,
    /// Sent by the background push.
    pub pushed_pages: u64,
    /// Sent on demand, answering the destination's faults.
    pub requested_pages: u64,
    /// Accesses to missing pages the destination saw (including never
    /// written ones it filled with zeros itself).
    pub faults: u64,
    /// Remote fault latency at the destination, from reading the fault to
    /// placing the page, microseconds.
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// From the VM's start on the destination to its last page placed.
    pub last_page_ms: f64,
    /// From the commit to the destination's word that it holds every page.
    pub duration_ms: f64,
    /// Times the link failed and was opened again.
    pub recoveries: u32,
    pub bytes_sent: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    pub mode: String,
    pub outcome: String,
    pub destination: String,
    /// What the connections ran over: `tls1.3 SUITE, peer host NAME`, or
    /// `plaintext (insecure, asked on both sides)`.
    #[serde(default)]
    pub transport: String,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub downtime_target_ms: f64,
    pub bandwidth_limit: Option<u64>,
    /// Connect, handshake and the destination's reservation.
    pub setup_ms: f64,
    /// From the start to the commit acknowledged.
    pub total_ms: f64,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub throughput_mibs: f64,
    pub max_throttle_percent: u32,
    /// Page-data streams the large rounds went out on (0: every page went
    /// on the main connection).
    #[serde(default)]
    pub streams: u32,
    pub rounds: Vec<RoundReport>,
    pub blackout: BlackoutReport,
    pub guest: GuestSeen,
    /// (milliseconds since start, bytes sent so far), about every 10 ms:
    /// the evidence that a bandwidth cap held.
    pub timeline: Vec<(f64, u64)>,
    /// Present when the VM moved before all of its memory.
    pub postcopy: Option<PostcopyReport>,
    /// Present in auto mode: what was expected, to set beside what happened.
    pub prediction: Option<Prediction>,
    /// Present for a VM with a network device: the frames the source held
    /// from the pause and forwarded after the commit (in a post-copy, v11,
    /// while the pages were served).
    #[serde(default)]
    pub network: Option<crate::handover::ForwardReport>,
    /// Present when the VM's disk was copied with it (`--copy-storage`).
    #[serde(default)]
    pub disk_copy: Option<DiskCopyReport>,
}

/// What copying a local disk with the VM did. Its blocks travel as pages
/// of the disk's range, so they are in `bytes_sent` and the rounds too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskCopyReport {
    /// The image on the source.
    pub image: String,
    pub image_bytes: u64,
    /// 4 KiB blocks the first pass read (the image's allocated part).
    pub first_pass_blocks: u64,
    /// Every block read and sent: the first pass and the ones the guest
    /// wrote again behind it.
    pub blocks_sent: u64,
    /// Of which sent with the VM paused.
    pub blackout_blocks: u64,
    /// Dirty-block harvests that found guest writes to send again.
    pub rounds_with_writes: u32,
    /// From the switch to write-blocking (the guest wrote faster than the
    /// link carried the copy) to the pause; 0: never switched.
    #[serde(default)]
    pub write_blocking_ms: f64,
    /// Guest writes that waited for the copy, and the longest wait.
    #[serde(default)]
    pub writes_held: u64,
    #[serde(default)]
    pub longest_hold_ms: f64,
    /// Writes let through after the longest hold with the copy not there
    /// yet (they are sent later all the same).
    #[serde(default)]
    pub writes_released_unsent: u64,
}

impl MigrationReport {
    /// The most bytes sent in any window of `window_ms`, from the timeline.
    pub fn peak_bytes_in_window(&self, window_ms: f64) -> u64 {
        let t = &self.timeline;
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..t.len() {
            while t[hi].0 - t[lo].0 > window_ms {
                lo += 1;
            }
            // Bytes counted at a sample were sent before it: the window
            // (t[lo-1], t[hi]] holds what was sent between those samples.
            let base = if lo == 0 { 0 } else { t[lo - 1].1 };
            best = best.max(t[hi].1 - base);
        }
        best
    }
}

pub fn mib_per_s(bytes: u64, ms: f64) -> f64 {
    if ms <= 0.0 {
        return 0.0;
    }
    bytes as f64 / (1 << 20) as f64 / (ms / 1e3)
}
