//! The storage rows: the same VM moved with a disk the guest writes and
//! checks, and without it, alternating in one run. `disk-shared` keeps the
//! image on storage both hosts share (the lock handed over in the
//! blackout); its target is a blackout at most 1 ms longer than without
//! the disk. `disk-local` copies the image (`--copy-storage`) and sets its
//! total, stall and bytes beside the disk-less move, and beside QEMU's
//! move of the same VM with its disk (a mirror to an NBD export on the
//! destination, libvirt's way: [`super::qemu_disk`]) in the same run,
//! the same guest file, image size, workload and memory policy.

use std::path::Path;

use serde::Serialize;

use super::ferry_side::{run_ferry_migration, BenchDisk, FerryOutcome};
use super::qemu::{run_qemu_migration, QemuMigration, QemuOutcome};
use super::qemu_disk::QemuDisk;
use super::{median, Row, RowResult};
use ferry_testguest::disk::{DiskLoad, DiskRate};
use ferry_testguest::net::GuestWorkload;
use ferry_testguest::workload::Workload;

/// How the row's VM keeps its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskRow {
    Shared,
    Local,
}

/// The shared row's target: the disk adds at most this to the blackout.
pub const SHARED_EXTRA_TARGET_MS: f64 = 1.0;
/// MiB of blocks the guest writes and checks.
const DISK_MIB: u64 = 1;
/// The image: larger than what the guest writes, and sparse.
const IMAGE_MIB: u64 = 16;

/// The storage row's figures, with and without the disk, in medians.
#[derive(Debug, Serialize)]
pub struct StorageResult {
    pub kind: DiskRow,
    pub with_disk_downtime_ms: f64,
    pub without_disk_downtime_ms: f64,
    /// What the disk added to the host-side downtime.
    pub extra_downtime_ms: f64,
    pub with_disk_total_ms: f64,
    pub without_disk_total_ms: f64,
    pub with_disk_stall_ms: f64,
    pub without_disk_stall_ms: f64,
    pub with_disk_mib_sent: f64,
    pub without_disk_mib_sent: f64,
    /// Shared: whether the disk added at most [`SHARED_EXTRA_TARGET_MS`].
    pub target_kept: Option<bool>,
    /// The runs without the disk (the runs with it are the row's
    /// `ferry_runs`).
    pub without_disk_runs: Vec<FerryOutcome>,
    /// How QEMU took part, or why it did not.
    pub qemu: String,
    /// The local row's QEMU runs with the disk (the row's `qemu_runs`),
    /// medians; None when none completed.
    pub qemu_with_disk: Option<QemuDiskMedians>,
}

/// QEMU's moves with the disk, medians.
#[derive(Debug, Serialize)]
pub struct QemuDiskMedians {
    pub total_ms: f64,
    pub guest_stall_ms: f64,
    /// Memory and the mirror's NBD traffic.
    pub mib_sent: f64,
    pub ram_mib_sent: f64,
    pub mirror_mib_sent: f64,
    /// The mirror job's own count, the image's zero areas included.
    pub mirror_job_mib: f64,
    pub mirror_ready_ms: f64,
    /// From the migration's end to the destination's `cont`.
    pub completion_to_cont_ms: f64,
    /// Runs verified (memory and a whole round of disk blocks) / runs.
    pub verified: String,
}

impl QemuDiskMedians {
    fn of(runs: &[QemuOutcome]) -> Option<Self> {
        let disk: Vec<_> = runs.iter().filter_map(|r| r.disk.as_ref()).collect();
        if disk.is_empty() {
            return None;
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let of = |v: Vec<f64>| median(v);
        Some(Self {
            total_ms: of(runs.iter().map(|r| r.total_ms).collect()),
            guest_stall_ms: of(runs.iter().map(|r| r.guest_stall_ms).collect()),
            mib_sent: of(runs.iter().map(|r| mib(r.transferred_bytes)).collect()),
            ram_mib_sent: of(disk.iter().map(|d| mib(d.ram_bytes)).collect()),
            mirror_mib_sent: of(disk.iter().map(|d| mib(d.mirror_bytes_sent)).collect()),
            mirror_job_mib: of(disk.iter().map(|d| mib(d.mirror_job_bytes)).collect()),
            mirror_ready_ms: of(disk.iter().map(|d| d.mirror_ready_ms).collect()),
            completion_to_cont_ms: of(disk.iter().map(|d| d.completion_to_cont_ms).collect()),
            verified: format!(
                "{}/{}",
                runs.iter().filter(|r| r.verified).count(),
                runs.len()
            ),
        })
    }
}

/// Runs the row `reps` times with the disk and without, alternating; the
/// local row with `qemu_elf` also runs QEMU with the disk each time.
pub fn run_row(
    result: &mut RowResult,
    kind: DiskRow,
    workload: Workload,
    reps: usize,
    dir: &Path,
    qemu_elf: Option<&Path>,
    on_run: &mut dyn FnMut(&str),
) {
    let row = result.row.clone();
    let mut without = Vec::new();
    for rep in 1..=reps {
        on_run(&format!("{} ferry with the disk {rep}/{reps}", row.name));
        match with_disk(&row, kind, workload, dir) {
            Ok(o) => result.ferry_runs.push(o),
            Err(e) => result.ferry_errors.push(format!("{e:#}")),
        }
        on_run(&format!("{} ferry without the disk {rep}/{reps}", row.name));
        match run_ferry_migration(&row.ferry_migration(workload, None), dir) {
            Ok(o) => without.push(o),
            Err(e) => result.ferry_errors.push(format!("without the disk: {e:#}")),
        }
        if let (DiskRow::Local, Some(elf)) = (kind, qemu_elf) {
            on_run(&format!("{} qemu with the disk {rep}/{reps}", row.name));
            match qemu_with_disk(&row, workload, elf, dir) {
                Ok(o) => result.qemu_runs.push(o),
                Err(e) => result.qemu_errors.push(format!("{e:#}")),
            }
        }
    }
    let med =
        |runs: &[FerryOutcome], f: fn(&FerryOutcome) -> f64| median(runs.iter().map(f).collect());
    let with = &result.ferry_runs;
    if with.is_empty() || without.is_empty() {
        return;
    }
    let downtime = |o: &FerryOutcome| o.host_downtime_ms;
    let extra = med(with, downtime) - med(&without, downtime);
    result.storage = Some(StorageResult {
        kind,
        with_disk_downtime_ms: med(with, downtime),
        without_disk_downtime_ms: med(&without, downtime),
        extra_downtime_ms: extra,
        with_disk_total_ms: med(with, |o| o.total_ms),
        without_disk_total_ms: med(&without, |o| o.total_ms),
        with_disk_stall_ms: med(with, |o| o.guest_stall_ms),
        without_disk_stall_ms: med(&without, |o| o.guest_stall_ms),
        with_disk_mib_sent: med(with, |o| o.transferred_bytes as f64 / (1 << 20) as f64),
        without_disk_mib_sent: med(&without, |o| o.transferred_bytes as f64 / (1 << 20) as f64),
        target_kept: (kind == DiskRow::Shared).then_some(extra <= SHARED_EXTRA_TARGET_MS),
        without_disk_runs: without,
        qemu: match (kind, qemu_elf) {
            (DiskRow::Shared, _) => {
                "QEMU not run: the row sets Ferry with a disk beside Ferry without".into()
            }
            (DiskRow::Local, None) => "QEMU not run (--no-qemu)".into(),
            (DiskRow::Local, Some(_)) => "QEMU: blockdev-mirror (sync=full) to an NBD export \
                 on the destination, READY, migrate, block-job-cancel, nbd-server-stop, cont"
                .into(),
        },
        qemu_with_disk: QemuDiskMedians::of(&result.qemu_runs),
    });
}

/// QEMU's move of the same VM with its disk: a fresh sparse image of the
/// same size on each side; both are removed after.
fn qemu_with_disk(
    row: &Row,
    workload: Workload,
    elf: &Path,
    dir: &Path,
) -> anyhow::Result<QemuOutcome> {
    let image = dir.join(format!("bench-disk-{}-qemu.img", std::process::id()));
    let copy = dir.join(format!("bench-disk-{}-qemu-on-b.img", std::process::id()));
    let made = [&image, &copy]
        .into_iter()
        .try_for_each(|p| std::fs::File::create(p)?.set_len(IMAGE_MIB << 20));
    let outcome = made.map_err(anyhow::Error::from).and_then(|()| {
        let guest = GuestWorkload {
            workload,
            net: None,
            disk: Some(DiskLoad {
                mib: DISK_MIB,
                rate: DiskRate::Max,
            }),
        };
        let mut q = QemuMigration::new(
            elf,
            row.mem_bytes,
            ferry_testguest::guest_cmdline_with_net(&guest, 1, None),
        );
        q.prealloc = row.prealloc;
        q.downtime_ms = row.downtime_ms;
        q.max_bandwidth = row.bandwidth;
        q.disk = Some(QemuDisk::new(image.clone(), copy.clone(), DISK_MIB));
        Ok(run_qemu_migration(&q)?)
    });
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&copy);
    outcome
}

/// One move with the disk, on a fresh sparse image (and, for the copy, a
/// destination image that does not exist yet); both are removed after.
fn with_disk(
    row: &Row,
    kind: DiskRow,
    workload: Workload,
    dir: &Path,
) -> anyhow::Result<FerryOutcome> {
    let image = dir.join(format!("bench-disk-{}.img", std::process::id()));
    let copy = dir.join(format!("bench-disk-{}-on-b.img", std::process::id()));
    let _ = std::fs::remove_file(&copy);
    std::fs::File::create(&image)?.set_len(IMAGE_MIB << 20)?;
    let disk = BenchDisk {
        image: image.clone(),
        copy_to: (kind == DiskRow::Local).then(|| copy.clone()),
        mib: DISK_MIB,
    };
    let outcome = run_ferry_migration(&row.ferry_migration(workload, Some(disk)), dir);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&copy);
    outcome
}

/// The storage row's figures for people, and its target kept or MISSED.
pub fn print(name: &str, s: &StorageResult) {
    let ms = |v: f64| format!("{v:.2}");
    println!(
        "\n{name}: the same VM with its disk ({:?}) and without, medians",
        s.kind
    );
    println!("| | with the disk | without | difference |");
    println!("|---|---|---|---|");
    let rows = [
        (
            "host-side downtime ms",
            s.with_disk_downtime_ms,
            s.without_disk_downtime_ms,
        ),
        ("total ms", s.with_disk_total_ms, s.without_disk_total_ms),
        (
            "guest-seen stall ms",
            s.with_disk_stall_ms,
            s.without_disk_stall_ms,
        ),
        ("MiB sent", s.with_disk_mib_sent, s.without_disk_mib_sent),
    ];
    for (what, with, without) in rows {
        println!(
            "| {what} | {} | {} | {} |",
            ms(with),
            ms(without),
            ms(with - without)
        );
    }
    match s.target_kept {
        Some(kept) => println!(
            "target: the disk adds at most {SHARED_EXTRA_TARGET_MS} ms to the blackout: {} ({:+.2} ms)",
            if kept { "kept" } else { "MISSED" },
            s.extra_downtime_ms
        ),
        None => println!("{}", s.qemu),
    }
    if let Some(q) = &s.qemu_with_disk {
        print_qemu(name, s, q);
    }
}

/// Ferry with the disk beside QEMU with the disk.
fn print_qemu(name: &str, s: &StorageResult, q: &QemuDiskMedians) {
    let ms = |v: f64| format!("{v:.2}");
    let ratio = |f: f64, q: f64| {
        if q > 0.0 && f.is_finite() && q.is_finite() {
            format!("{:.2}", f / q)
        } else {
            "-".into()
        }
    };
    println!(
        "\n{name}: Ferry (--copy-storage) and QEMU (mirror to NBD), both with the disk, medians"
    );
    println!("| | ferry | qemu | ferry/qemu |");
    println!("|---|---|---|---|");
    let rows = [
        ("total ms", s.with_disk_total_ms, q.total_ms),
        (
            "guest-seen stall ms",
            s.with_disk_stall_ms,
            q.guest_stall_ms,
        ),
        ("MiB sent", s.with_disk_mib_sent, q.mib_sent),
    ];
    for (what, f, qv) in rows {
        println!("| {what} | {} | {} | {} |", ms(f), ms(qv), ratio(f, qv));
    }
    println!(
        "qemu: {} MiB of memory + {} MiB on the mirror's NBD connection (the job counted {} MiB, holes included); READY after {} ms; {} ms from the migration's end to the destination's cont; verified {}",
        ms(q.ram_mib_sent),
        ms(q.mirror_mib_sent),
        ms(q.mirror_job_mib),
        ms(q.mirror_ready_ms),
        ms(q.completion_to_cont_ms),
        q.verified
    );
}
