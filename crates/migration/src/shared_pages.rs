//! A page set that several threads update at once without a lock: during
//! post-copy the fault service, the push and the receivers all mark and
//! test pages (sent, requested, arrived) concurrently.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bitmap::PageBitmap;
use crate::protocol::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

struct SharedRange {
    gpa: u64,
    pages: u64,
    bits: Vec<AtomicU64>,
}

pub struct SharedPages {
    ranges: Vec<SharedRange>,
    count: AtomicU64,
}

impl SharedPages {
    /// An empty set over the same ranges as `shape`.
    pub fn empty_like(shape: &PageBitmap) -> Self {
        Self {
            ranges: shape
                .ranges
                .iter()
                .map(|r| SharedRange {
                    gpa: r.gpa,
                    pages: r.pages,
                    bits: r.bits.iter().map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
            count: AtomicU64::new(0),
        }
    }

    /// A set holding exactly the pages of `set`.
    pub fn from_bitmap(set: &PageBitmap) -> Self {
        Self {
            ranges: set
                .ranges
                .iter()
                .map(|r| SharedRange {
                    gpa: r.gpa,
                    pages: r.pages,
                    bits: r.bits.iter().map(|&w| AtomicU64::new(w)).collect(),
                })
                .collect(),
            count: AtomicU64::new(set.count()),
        }
    }

    fn locate(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        self.ranges.iter().find_map(|r| {
            let page = gpa.checked_sub(r.gpa)? / PAGE;
            (page < r.pages).then(|| (&r.bits[(page / 64) as usize], 1u64 << (page % 64)))
        })
    }

    /// Adds the page holding `gpa`; true if it was not in the set before
    /// (exactly one caller sees true per page). Pages outside every range
    /// are never in the set.
    pub fn insert(&self, gpa: u64) -> bool {
        let Some((word, bit)) = self.locate(gpa) else {
            return false;
        };
        let fresh = word.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if fresh {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        fresh
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(word, bit)| word.load(Ordering::Acquire) & bit != 0)
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The set as it is now.
    pub fn snapshot(&self) -> PageBitmap {
        PageBitmap {
            ranges: self
                .ranges
                .iter()
                .map(|r| crate::bitmap::RangeBits {
                    gpa: r.gpa,
                    pages: r.pages,
                    bits: r.bits.iter().map(|w| w.load(Ordering::Acquire)).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RamRange;

    #[test]
    fn each_page_is_inserted_once_across_threads() {
        let shape = PageBitmap::new(&[RamRange {
            gpa: 0x1000,
            len: 1000 * PAGE,
        }]);
        let set = SharedPages::empty_like(&shape);
        let fresh: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000u64)
                            .filter(|p| set.insert(0x1000 + p * PAGE))
                            .count() as u64
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(fresh, 1000);
        assert_eq!(set.count(), 1000);
        assert!(set.contains(0x1000 + 999 * PAGE + 5));
        assert!(!set.insert(0));
        assert!(!set.contains(0x1000 + 1000 * PAGE));
        assert_eq!(set.snapshot().count(), 1000);
    }
}
