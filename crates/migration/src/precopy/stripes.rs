//! Which page-data stream carries which pages when a round goes out on
//! several streams: guest memory is cut into 2 MiB stripes, dealt
//! round-robin by guest address. Both sides compute the same deal, so each
//! receiver writes only memory no other receiver touches, and a stream that
//! sends a page outside its stripes is caught as a protocol violation.

use crate::protocol::{PageRun, PAGE_SIZE};

/// Stripe size: large enough that a stripe fills a few batches (runs stay
/// long, batches full), small enough that every stream gets an even share
/// of a few hundred MiB.
pub const STRIPE_BYTES: u64 = 2 << 20;

/// Most page-data streams one migration may open.
pub const MAX_STREAMS: u16 = 8;

/// The stream (0-based) that carries the page at `gpa`.
pub fn owner(gpa: u64, streams: usize) -> usize {
    ((gpa / STRIPE_BYTES) % streams as u64) as usize
}

/// `runs` dealt over `streams` streams, cut at stripe boundaries.
pub fn deal(runs: &[PageRun], streams: usize) -> Vec<Vec<PageRun>> {
    let mut dealt = vec![Vec::new(); streams];
    for run in runs {
        let mut gpa = run.gpa;
        let mut left = u64::from(run.pages);
        while left > 0 {
            let to_boundary = (STRIPE_BYTES - gpa % STRIPE_BYTES) / PAGE_SIZE as u64;
            let pages = left.min(to_boundary.max(1));
            let share: &mut Vec<PageRun> = &mut dealt[owner(gpa, streams)];
            match share.last_mut() {
                Some(last) if last.end() == Some(gpa) => last.pages += pages as u32,
                _ => share.push(PageRun {
                    gpa,
                    pages: pages as u32,
                }),
            }
            gpa += pages * PAGE_SIZE as u64;
            left -= pages;
        }
    }
    dealt
}

/// Guest memory (one mutable slice per RAM range, with its guest address)
/// cut at stripe boundaries and handed to the stream that owns each piece.
/// For each stream: (guest address, memory) per piece.
pub fn cut<'m>(ram: Vec<(u64, &'m mut [u8])>, streams: usize) -> Vec<Vec<(u64, &'m mut [u8])>> {
    let mut out: Vec<Vec<(u64, &'m mut [u8])>> = (0..streams).map(|_| Vec::new()).collect();
    for (mut gpa, mut rest) in ram {
        while !rest.is_empty() {
            let to_boundary = (STRIPE_BYTES - gpa % STRIPE_BYTES) as usize;
            let (piece, tail) = rest.split_at_mut(to_boundary.min(rest.len()));
            let len = piece.len() as u64;
            out[owner(gpa, streams)].push((gpa, piece));
            gpa += len;
            rest = tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pages(bytes: u64) -> u32 {
        (bytes / PAGE_SIZE as u64) as u32
    }

    #[test]
    fn a_run_is_cut_at_stripe_boundaries_and_dealt_round_robin() {
        let runs = [PageRun {
            gpa: MIB,
            pages: pages(6 * MIB),
        }];
        let dealt = deal(&runs, 2);
        assert_eq!(
            dealt[0],
            vec![
                PageRun {
                    gpa: MIB,
                    pages: pages(MIB)
                },
                PageRun {
                    gpa: 4 * MIB,
                    pages: pages(2 * MIB)
                },
            ]
        );
        assert_eq!(
            dealt[1],
            vec![
                PageRun {
                    gpa: 2 * MIB,
                    pages: pages(2 * MIB)
                },
                PageRun {
                    gpa: 6 * MIB,
                    pages: pages(MIB)
                },
            ]
        );
    }

    #[test]
    fn every_page_goes_to_exactly_one_stream() {
        let runs = [
            PageRun { gpa: 0, pages: 3 },
            PageRun {
                gpa: 3 * MIB - 4096,
                pages: 700,
            },
            PageRun {
                gpa: 64 * MIB,
                pages: 1,
            },
        ];
        for streams in 1..=4 {
            let dealt = deal(&runs, streams);
            let mut seen: Vec<u64> = Vec::new();
            for (i, share) in dealt.iter().enumerate() {
                for r in share {
                    for p in 0..u64::from(r.pages) {
                        let gpa = r.gpa + p * PAGE_SIZE as u64;
                        assert_eq!(owner(gpa, streams), i);
                        seen.push(gpa);
                    }
                }
            }
            seen.sort_unstable();
            let mut want: Vec<u64> = runs
                .iter()
                .flat_map(|r| (0..u64::from(r.pages)).map(move |p| r.gpa + p * 4096))
                .collect();
            want.sort_unstable();
            assert_eq!(seen, want, "{streams} streams");
        }
    }

    #[test]
    fn memory_is_cut_into_the_same_stripes() {
        let mut a = vec![0u8; (5 * MIB) as usize];
        let mut b = vec![0u8; (2 * MIB) as usize];
        let ram = vec![(MIB, a.as_mut_slice()), (16 * MIB, b.as_mut_slice())];
        let pieces = cut(ram, 2);
        for (i, share) in pieces.iter().enumerate() {
            for (gpa, mem) in share {
                assert_eq!(owner(*gpa, 2), i);
                assert_eq!(owner(gpa + mem.len() as u64 - 1, 2), i);
            }
        }
        let total: usize = pieces.iter().flatten().map(|(_, m)| m.len()).sum();
        assert_eq!(total as u64, 7 * MIB);
    }
}
