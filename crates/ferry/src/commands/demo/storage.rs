//! `ferry demo storage --shared|--local`: the direct demo with a disk the
//! guest writes and checks. With `--shared` both hosts open the same image
//! (storage they share) and its lock is handed over in the blackout; with
//! `--local` the image is copied to host B's own image while the VM runs
//! (`--copy-storage`). The verdict needs B's guest to read back and check
//! a whole round of its disk, with no lost or stale block, and B to hold
//! the image's lock.

use std::path::PathBuf;

use anyhow::Context;
use ferry_migration::stats::{
    MigrationReport, PART_STATE_SAVE, PART_STATE_TO_DESTINATION, PART_STORAGE,
};
use ferry_testguest::console::DiskCounters;
use ferry_vmm::devices::block::lock::{probe, LockState};

use super::say;
use crate::commands::run::VmArgs;

/// MiB of blocks the guest writes and checks: one checked round takes a
/// few seconds on this host's disk.
const DISK_MIB: u64 = 1;
/// The image: larger than what the guest writes, and sparse, so the copy's
/// first pass shows that it skips what holds no data.
const IMAGE_MIB: u64 = 16;

/// Which storage the demo's VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    Shared,
    Local,
}

/// What the demo saw of the disk, for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct StorageOutcome {
    pub kind: StorageKind,
    pub image_on_a: String,
    pub image_on_b: String,
    pub image_bytes: u64,
    /// Shared: the blackout's "disk flush + unlock" part (A gives the lock
    /// up), ms.
    pub lock_released_ms: Option<f64>,
    /// Shared: from A giving the lock up to B having taken it (B takes it
    /// while it loads the state), at most, ms.
    pub lock_handover_ms: Option<f64>,
    /// Local: what the copy did.
    pub copy: Option<ferry_migration::stats::DiskCopyReport>,
    /// Local: how long the copy was in write-blocking (the guest's writes
    /// waiting for the copy); 0 when the copy kept up.
    pub write_blocking_ms: f64,
    pub b_holds_lock: bool,
    /// Blocks B's guest read back and checked after the move.
    pub blocks_checked_on_b: u64,
    pub disk_errors_on_b: u64,
}

/// The demo's images, in a directory removed when the scene goes.
pub struct StorageScene {
    kind: StorageKind,
    dir: PathBuf,
    image_a: PathBuf,
    image_b: PathBuf,
}

impl StorageScene {
    pub fn up(kind: StorageKind) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferry-demo-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot make the demo's directory {}", dir.display()))?;
        let image_a = dir.join("vm.img");
        let file = std::fs::File::create(&image_a)
            .with_context(|| format!("cannot make the demo's image {}", image_a.display()))?;
        file.set_len(IMAGE_MIB << 20)?;
        let image_b = match kind {
            StorageKind::Shared => image_a.clone(),
            StorageKind::Local => dir.join("vm-on-b.img"),
        };
        Ok(Self {
            kind,
            dir,
            image_a,
            image_b,
        })
    }

    /// The demo's VM with its disk, writing and checking it.
    pub fn vm_args(&self, base: &VmArgs) -> anyhow::Result<VmArgs> {
        let mut vm = base.clone();
        let workload = format!("{}+disk:{DISK_MIB}:max", base.workload());
        vm.workload = Some(workload.parse().map_err(|e| anyhow::anyhow!("{e}"))?);
        vm.disk = Some(format!("path={}", self.image_a.display()).parse()?);
        Ok(vm)
    }

    /// `ferry receive`'s disk: the same image, or a new one for the copy.
    pub fn host_b_args(&self) -> Vec<String> {
        vec!["--disk".into(), format!("path={}", self.image_b.display())]
    }

    pub fn copies(&self) -> bool {
        self.kind == StorageKind::Local
    }

    /// Blocks in one checked round of the guest's disk.
    pub fn round_blocks(&self) -> u64 {
        DISK_MIB << 8
    }

    pub fn describe(&self) -> String {
        match self.kind {
            StorageKind::Shared => format!(
                "direct with a disk on shared storage: both hosts open {}",
                self.image_a.display()
            ),
            StorageKind::Local => format!(
                "direct with a local disk: {} on host A is copied to {} on host B",
                self.image_a.display(),
                self.image_b.display()
            ),
        }
    }

    /// Prints what happened to the disk and says what failed, if anything;
    /// removes the images. `on_b` is B's first and last disk counters.
    pub fn finish(
        self,
        report: &MigrationReport,
        on_b: Option<(DiskCounters, DiskCounters)>,
        json: bool,
    ) -> (StorageOutcome, Option<String>) {
        let part = |name: &str| {
            report
                .blackout
                .parts
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.ms)
        };
        let (lock_released_ms, lock_handover_ms) = match self.kind {
            StorageKind::Shared => (
                part(PART_STORAGE),
                Some(
                    part(PART_STATE_SAVE).unwrap_or_default()
                        + part(PART_STATE_TO_DESTINATION).unwrap_or_default(),
                ),
            ),
            StorageKind::Local => (None, None),
        };
        let b_holds_lock = probe(&self.image_b).is_ok_and(|s| s == LockState::Held);
        let (checked, errors) = on_b.map_or((0, 0), |(first, last)| {
            (last.disk_ver - first.disk_ver, last.disk_err)
        });
        let outcome = StorageOutcome {
            kind: self.kind,
            image_on_a: self.image_a.display().to_string(),
            image_on_b: self.image_b.display().to_string(),
            image_bytes: IMAGE_MIB << 20,
            lock_released_ms,
            lock_handover_ms,
            copy: report.disk_copy.clone(),
            write_blocking_ms: report
                .disk_copy
                .as_ref()
                .map_or(0.0, |c| c.write_blocking_ms),
            b_holds_lock,
            blocks_checked_on_b: checked,
            disk_errors_on_b: errors,
        };
        print_outcome(&outcome, json);
        let failure = judge(&outcome, self.round_blocks(), self.copies());
        (outcome, failure)
    }
}

impl Drop for StorageScene {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "ferry demo storage: could not remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// How long the guest's writes waited for the copy, and how many did.
fn write_blocking_line(o: &StorageOutcome) -> String {
    match &o.copy {
        Some(c) if c.writes_held > 0 || c.write_blocking_ms > 0.0 => format!(
            "{:.1} ms: {} writes waited for the copy, the longest {:.1} ms",
            c.write_blocking_ms, c.writes_held, c.longest_hold_ms
        ),
        _ => "not needed: the copy kept up with the guest's writes".into(),
    }
}

fn print_outcome(o: &StorageOutcome, json: bool) {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} ms"));
    say!(json, "");
    say!(json, "  the disk across the migration");
    let mut rows = vec![(
        "image",
        format!(
            "{} on A, {} on B ({} MiB)",
            o.image_on_a,
            o.image_on_b,
            o.image_bytes >> 20
        ),
    )];
    match o.kind {
        StorageKind::Shared => {
            rows.push(("lock given up by A", ms(o.lock_released_ms)));
            rows.push((
                "lock hand-over",
                format!(
                    "B took it at most {} after A gave it up, while loading the state",
                    ms(o.lock_handover_ms)
                ),
            ));
        }
        StorageKind::Local => {
            if let Some(c) = &o.copy {
                rows.push((
                    "blocks copied",
                    format!(
                        "{} of 4 KiB: {} in the first pass (the image's allocated part), {} in the blackout",
                        c.blocks_sent, c.first_pass_blocks, c.blackout_blocks
                    ),
                ));
                rows.push((
                    "rounds",
                    format!(
                        "{} harvests found guest writes to send again",
                        c.rounds_with_writes
                    ),
                ));
            }
            rows.push(("write-blocking", write_blocking_line(o)));
        }
    }
    rows.push((
        "B holds the lock",
        if o.b_holds_lock { "yes" } else { "NO" }.to_string(),
    ));
    rows.push((
        "checked on B",
        format!(
            "{} blocks read back against the last acknowledged write, {} errors",
            o.blocks_checked_on_b, o.disk_errors_on_b
        ),
    ));
    for (k, v) in rows {
        say!(json, "  {k:<26} {v}");
    }
}

/// Why the disk part failed, if it did.
fn judge(o: &StorageOutcome, round: u64, copies: bool) -> Option<String> {
    let mut wrong = Vec::new();
    if o.disk_errors_on_b > 0 {
        wrong.push(format!("{} disk errors on B", o.disk_errors_on_b));
    }
    if o.blocks_checked_on_b < round {
        wrong.push(format!(
            "B's guest checked {} blocks, not a whole round of {round}",
            o.blocks_checked_on_b
        ));
    }
    if !o.b_holds_lock {
        wrong.push("B does not hold the image's lock".into());
    }
    if copies && o.copy.as_ref().is_none_or(|c| c.blocks_sent == 0) {
        wrong.push("the report shows no block copied".into());
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}
