//! Which blocks of the image the guest wrote since the last look: the copy
//! of a local disk (`--copy-storage`) sends the whole image once, then the
//! blocks this set names, round by round, as it does dirty memory pages.
//!
//! A block is marked after its write returned, never before: a copy that
//! read the block while the write ran (and so may hold old or torn data)
//! finds the mark at its next harvest and sends the block again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One bit covers this many bytes: the migration's page, so that a block
/// travels as one page of the disk's range.
pub const DIRTY_BLOCK: u64 = 4096;

/// A bitmap over the image's blocks, written by the device's worker and
/// harvested by the migration; lock-free, so a harvest never waits for a
/// request and a request never waits for a harvest.
#[derive(Debug)]
pub struct DirtyBlocks {
    tracking: AtomicBool,
    blocks: u64,
    words: Vec<AtomicU64>,
    /// Harvests so far: what a write waiting for the copy counts on
    /// ([`super::copy_hold`]).
    harvests: AtomicU64,
}

impl DirtyBlocks {
    /// An empty set over an image of `bytes`, not tracking.
    pub fn new(bytes: u64) -> DirtyBlocks {
        let blocks = bytes.div_ceil(DIRTY_BLOCK);
        DirtyBlocks {
            tracking: AtomicBool::new(false),
            blocks,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            harvests: AtomicU64::new(0),
        }
    }

    /// Blocks the image holds (the last one may be partial).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Starts recording writes (with an empty set) or stops.
    pub fn set_tracking(&self, on: bool) {
        if on {
            self.harvest();
        }
        self.tracking.store(on, Ordering::SeqCst);
    }

    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Records a write of `len` bytes at `offset` (one that has returned).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        let first = offset / DIRTY_BLOCK;
        let last =
            (offset.saturating_add(len - 1) / DIRTY_BLOCK).min(self.blocks.saturating_sub(1));
        for block in first..=last {
            self.words[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::SeqCst);
        }
    }

    /// Every block written since the previous harvest, one bit per block
    /// (bit i of word w is block 64w + i); clears the set.
    pub fn harvest(&self) -> Vec<u64> {
        let bits = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect();
        self.harvests.fetch_add(1, Ordering::SeqCst);
        bits
    }

    /// How many harvests there have been.
    pub fn harvests(&self) -> u64 {
        self.harvests.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of(words: &[u64]) -> Vec<u64> {
        (0..words.len() as u64 * 64)
            .filter(|b| words[(b / 64) as usize] & (1 << (b % 64)) != 0)
            .collect()
    }

    #[test]
    fn nothing_is_recorded_until_tracking_starts() {
        let d = DirtyBlocks::new(1 << 20);
        d.mark(0, 4096);
        assert!(blocks_of(&d.harvest()).is_empty());
        d.set_tracking(true);
        d.mark(0, 4096);
        assert_eq!(blocks_of(&d.harvest()), vec![0]);
    }

    #[test]
    fn a_write_marks_every_block_it_touches_and_a_harvest_clears_them() {
        let d = DirtyBlocks::new(1 << 20);
        d.set_tracking(true);
        // One sector straddling blocks 1 and 2, and 3 whole blocks from 64.
        d.mark(2 * 4096 - 512, 1024);
        d.mark(64 * 4096, 3 * 4096);
        assert_eq!(blocks_of(&d.harvest()), vec![1, 2, 64, 65, 66]);
        assert!(blocks_of(&d.harvest()).is_empty());
    }

    #[test]
    fn a_write_at_the_end_stays_inside_the_image() {
        // 10 blocks and a half: the half block is block 10.
        let d = DirtyBlocks::new(10 * 4096 + 2048);
        assert_eq!(d.blocks(), 11);
        d.set_tracking(true);
        d.mark(10 * 4096, 2048);
        d.mark(10 * 4096 + 1024, u64::MAX / 2);
        assert_eq!(blocks_of(&d.harvest()), vec![10]);
    }

    #[test]
    fn starting_again_forgets_what_an_earlier_migration_left() {
        let d = DirtyBlocks::new(1 << 20);
        d.set_tracking(true);
        d.mark(0, 4096);
        d.set_tracking(false);
        d.mark(4096, 4096);
        d.set_tracking(true);
        assert!(blocks_of(&d.harvest()).is_empty());
    }
}
