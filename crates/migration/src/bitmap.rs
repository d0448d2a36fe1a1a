//! A set of guest pages, one bit per page per RAM range: the dirty set the
//! source sends from, and the set of pages a destination has written.

use crate::protocol::{PageRun, RamRange, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// The pages of one RAM range; bit i is the page at `gpa + i * 4096`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeBits {
    pub gpa: u64,
    pub pages: u64,
    pub bits: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBitmap {
    pub ranges: Vec<RangeBits>,
}

impl PageBitmap {
    /// An empty set over `ranges`.
    pub fn new(ranges: &[RamRange]) -> Self {
        Self {
            ranges: ranges
                .iter()
                .map(|r| {
                    let pages = r.len / PAGE;
                    RangeBits {
                        gpa: r.gpa,
                        pages,
                        bits: vec![0; pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    pub fn count(&self) -> u64 {
        self.ranges
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(|r| r.bits.iter().all(|&w| w == 0))
    }

    pub fn bytes(&self) -> u64 {
        self.count() * PAGE
    }

    /// Bytes of the set in the ranges that start at or above `gpa` (a
    /// copied disk's blocks, above every RAM range).
    pub fn bytes_from(&self, gpa: u64) -> u64 {
        let pages: u64 = self
            .ranges
            .iter()
            .filter(|r| r.gpa >= gpa)
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        pages * PAGE
    }

    /// Adds every page of `other`, which must cover the same ranges.
    pub fn union_with(&mut self, other: &PageBitmap) {
        for (mine, theirs) in self.ranges.iter_mut().zip(&other.ranges) {
            debug_assert_eq!(mine.gpa, theirs.gpa);
            for (a, b) in mine.bits.iter_mut().zip(&theirs.bits) {
                *a |= b;
            }
        }
    }

    /// Which range holds `gpa`, and the page index inside it.
    fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        self.ranges.iter().enumerate().find_map(|(i, r)| {
            let page = gpa.checked_sub(r.gpa)? / PAGE;
            (page < r.pages).then_some((i, page))
        })
    }

    /// Sets (`on`) or clears the pages of `gpa..gpa+len` that lie in a range.
    pub fn set_range(&mut self, gpa: u64, len: u64, on: bool) {
        let mut at = gpa & !(PAGE - 1);
        let end = gpa.saturating_add(len);
        while at < end {
            let Some((i, page)) = self.locate(at) else {
                at += PAGE;
                continue;
            };
            let r = &mut self.ranges[i];
            let last = ((end - r.gpa).div_ceil(PAGE)).min(r.pages);
            for p in page..last {
                let (w, b) = ((p / 64) as usize, p % 64);
                if on {
                    r.bits[w] |= 1 << b;
                } else {
                    r.bits[w] &= !(1 << b);
                }
            }
            at = r.gpa + last * PAGE;
        }
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(i, p)| self.ranges[i].bits[(p / 64) as usize] >> (p % 64) & 1 == 1)
    }

    /// The set as maximal runs of consecutive pages, ascending.
    pub fn runs(&self) -> Vec<PageRun> {
        let mut out = Vec::new();
        for r in &self.ranges {
            let mut start: Option<u64> = None;
            for (w, &word) in r.bits.iter().enumerate() {
                if word == 0 && start.is_none() {
                    continue;
                }
                if word == u64::MAX && start.is_some() {
                    continue;
                }
                for b in 0..64 {
                    let p = w as u64 * 64 + b;
                    if p >= r.pages {
                        break;
                    }
                    let set = word >> b & 1 == 1;
                    match (set, start) {
                        (true, None) => start = Some(p),
                        (false, Some(s)) => {
                            push_run(&mut out, r.gpa + s * PAGE, p - s);
                            start = None;
                        }
                        _ => {}
                    }
                }
            }
            if let Some(s) = start {
                push_run(&mut out, r.gpa + s * PAGE, r.pages - s);
            }
        }
        out
    }
}

impl PageBitmap {
    /// The bits of every range, in order, as one list of words: how the
    /// set travels in a PostcopyBegin.
    pub fn to_words(&self) -> Vec<u64> {
        self.ranges
            .iter()
            .flat_map(|r| r.bits.iter().copied())
            .collect()
    }

    /// The inverse of `to_words` over `ranges`; None if the word count does
    /// not fit them or a bit lies past the end of its range.
    pub fn from_words(ranges: &[RamRange], words: &[u64]) -> Option<Self> {
        let mut set = Self::new(ranges);
        let expected: usize = set.ranges.iter().map(|r| r.bits.len()).sum();
        if words.len() != expected {
            return None;
        }
        let mut at = 0;
        for r in &mut set.ranges {
            let n = r.bits.len();
            r.bits.copy_from_slice(&words[at..at + n]);
            at += n;
            let tail = r.pages % 64;
            if tail != 0 && r.bits[n - 1] >> tail != 0 {
                return None;
            }
        }
        Some(set)
    }
}

/// Runs carry a u32 page count; longer stretches are split.
pub(crate) fn push_run(out: &mut Vec<PageRun>, gpa: u64, pages: u64) {
    let mut at = gpa;
    let mut left = pages;
    while left > 0 {
        let n = left.min(u64::from(u32::MAX));
        out.push(PageRun {
            gpa: at,
            pages: n as u32,
        });
        at += n * PAGE;
        left -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> Vec<RamRange> {
        vec![
            RamRange {
                gpa: 0,
                len: 200 * PAGE,
            },
            RamRange {
                gpa: 1 << 32,
                len: 70 * PAGE,
            },
        ]
    }

    #[test]
    fn runs_are_maximal_and_cross_words() {
        let mut b = PageBitmap::new(&ranges());
        b.set_range(60 * PAGE, 10 * PAGE, true);
        b.set_range(199 * PAGE, PAGE, true);
        b.set_range((1 << 32) + 64 * PAGE, 6 * PAGE, true);
        let runs = b.runs();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    gpa: 60 * PAGE,
                    pages: 10
                },
                PageRun {
                    gpa: 199 * PAGE,
                    pages: 1
                },
                PageRun {
                    gpa: (1 << 32) + 64 * PAGE,
                    pages: 6
                },
            ]
        );
        assert_eq!(b.count(), 17);
        assert!(b.contains(65 * PAGE) && !b.contains(70 * PAGE));
        b.set_range(62 * PAGE, 2 * PAGE, false);
        assert_eq!(b.count(), 15);
    }

    #[test]
    fn words_round_trip_and_reject_strays() {
        let ranges = ranges();
        let mut set = PageBitmap::new(&ranges);
        set.set_range(ranges[0].gpa + PAGE, 3 * PAGE, true);
        set.set_range(ranges[1].gpa, PAGE, true);
        let words = set.to_words();
        assert_eq!(PageBitmap::from_words(&ranges, &words), Some(set));
        assert_eq!(PageBitmap::from_words(&ranges, &words[1..]), None);
        let mut stray = vec![0u64; words.len()];
        *stray.last_mut().unwrap() = u64::MAX;
        let fits = ranges.last().unwrap().len / PAGE % 64 == 0;
        assert_eq!(PageBitmap::from_words(&ranges, &stray).is_some(), fits);
    }

    #[test]
    fn a_full_range_is_one_run_and_union_adds() {
        let mut a = PageBitmap::new(&ranges());
        a.set_range(0, 200 * PAGE, true);
        assert_eq!(a.runs(), vec![PageRun { gpa: 0, pages: 200 }]);
        let mut b = PageBitmap::new(&ranges());
        b.set_range(1 << 32, PAGE, true);
        b.union_with(&a);
        assert_eq!(b.count(), 201);
        // Outside every range: ignored.
        b.set_range(300 * PAGE, 5 * PAGE, true);
        assert_eq!(b.count(), 201);
    }
}
