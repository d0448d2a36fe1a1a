//! When a copied disk switches to write-blocking: the guest writes its
//! disk so that its blocks alone keep the rounds from converging. Memory
//! has the brake (auto-converge) for that; the disk has write-blocking,
//! which paces only the writes and leaves the vCPUs running.

use super::*;
use crate::protocol::DISK_COPY_BASE;

/// The guest's disk writes may take up to this share of the link before
/// its writes are made to wait for the copy.
pub(super) const DISK_OUTRUN_RATIO: f64 = 0.5;
/// Disk blocks that shrink by less than this from one round to the next
/// are not converging.
const NOT_SHRINKING: f64 = 0.9;

/// What the last harvests said of the copied disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct DiskRound {
    /// Dirty disk bytes in this harvest, and in the one before.
    pub(super) bytes: u64,
    pub(super) previous: Option<u64>,
    /// Since the harvest before.
    pub(super) elapsed: Duration,
}

/// Why the disk should switch to write-blocking, on a link that sends
/// `link_rate` bytes/s with a blackout target of `target`; None: the copy
/// keeps up. Two ways to outwrite the link:
/// - the guest dirties blocks at over half the link's rate;
/// - the dirty blocks alone would take longer than the target to send,
///   and they stopped shrinking. A guest that rewrites a small area fast
///   shows this way: its dirty set is capped by the area's size, so its
///   rate seen in the bitmap is only the area over the round's length.
pub(super) fn disk_outruns(disk: DiskRound, link_rate: f64, target: Duration) -> Option<String> {
    if disk.bytes == 0 {
        return None;
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    let rate = disk.bytes as f64 / disk.elapsed.as_secs_f64().max(1e-3);
    if rate >= DISK_OUTRUN_RATIO * link_rate {
        return Some(format!(
            "the guest wrote its disk at {:.1} MiB/s while the link carries {:.1} MiB/s: its writes now wait for the copy (write-blocking)",
            mib(rate),
            mib(link_rate)
        ));
    }
    let send = Duration::from_secs_f64(disk.bytes as f64 / link_rate.max(1.0));
    let stuck = disk
        .previous
        .is_some_and(|p| disk.bytes as f64 >= NOT_SHRINKING * p as f64);
    (stuck && send > target).then(|| {
        format!(
            "the disk's dirty blocks stopped shrinking at {:.2} MiB, {:.0} ms to send against a {:.0} ms target: its writes now wait for the copy (write-blocking)",
            mib(disk.bytes as f64),
            send.as_secs_f64() * 1e3,
            target.as_secs_f64() * 1e3
        )
    })
}

/// After a round's harvest: switches the disk to write-blocking if the
/// guest outwrites the link (once; it stays on until the pause).
pub(super) fn hold_disk_if_outrun<G: SourceGuest + ?Sized>(
    guest: &mut G,
    run: &mut Run<'_>,
    dirty: &PageBitmap,
    elapsed: Duration,
    target: Duration,
) -> Result<(), MigrateError> {
    if !run.copies_disks {
        return Ok(());
    }
    let disk = DiskRound {
        bytes: dirty.bytes_from(DISK_COPY_BASE),
        previous: run
            .last_disk_dirty
            .replace(dirty.bytes_from(DISK_COPY_BASE)),
        elapsed,
    };
    if run.disk_writes_held {
        return Ok(());
    }
    let Some(why) = disk_outruns(disk, run.link_rate(), target) else {
        return Ok(());
    };
    if guest.hold_disk_writes(true).map_err(MigrateError::guest(
        "switching the disk copy to write-blocking",
    ))? {
        run.disk_writes_held = true;
        run.say(why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_disk_blocks(blocks: u64) -> PageBitmap {
        let ranges = [
            RamRange {
                gpa: 0,
                len: 1 << 20,
            },
            RamRange {
                gpa: DISK_COPY_BASE,
                len: 1 << 20,
            },
        ];
        let mut b = PageBitmap::new(&ranges);
        // RAM pages never count.
        b.set_range(0, 64 * 4096, true);
        b.set_range(DISK_COPY_BASE, blocks * 4096, true);
        b
    }

    fn round(blocks: u64, previous: Option<u64>) -> DiskRound {
        DiskRound {
            bytes: with_disk_blocks(blocks).bytes_from(DISK_COPY_BASE),
            previous: previous.map(|b| b * 4096),
            elapsed: Duration::from_secs(1),
        }
    }

    const MIB: f64 = (1u64 << 20) as f64;
    const TARGET: Duration = Duration::from_millis(10);

    #[test]
    fn a_disk_written_at_half_the_link_or_more_is_held() {
        // 256 blocks (1 MiB) in a second against 4 MiB/s: a quarter.
        assert!(disk_outruns(round(256, None), 4.0 * MIB, TARGET).is_none());
        // Against 2 MiB/s: half.
        let why = disk_outruns(round(256, None), 2.0 * MIB, TARGET).unwrap();
        assert!(why.contains("at 1.0 MiB/s"), "{why}");
        // No disk writes at all: nothing to hold, however slow the link.
        assert!(disk_outruns(round(0, Some(0)), 1.0, TARGET).is_none());
    }

    #[test]
    fn dirty_blocks_that_stop_shrinking_above_the_target_are_held() {
        // A quarter of the link, 250 ms to send, and no smaller than the
        // round before: the area is rewritten faster than it leaves.
        let why = disk_outruns(round(256, Some(260)), 4.0 * MIB, TARGET).unwrap();
        assert!(why.contains("stopped shrinking"), "{why}");
        // Shrinking: the copy is catching up.
        assert!(disk_outruns(round(256, Some(400)), 4.0 * MIB, TARGET).is_none());
        // Not shrinking, but within the target already.
        assert!(disk_outruns(round(2, Some(2)), 4.0 * MIB, TARGET).is_none());
    }
}
