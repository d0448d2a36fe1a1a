//! What a disk block holds (README, "Disk"): every 4 KiB block `b` written
//! in generation `g` carries its own number and generation, a checksum
//! over the rest of its content, and a pattern derived from `(b, g)`, so a
//! block read back is either exactly the one expected or recognisably
//! something else: an older generation (stale), another block's data
//! (misplaced), or neither (corrupt).

use crate::workload::page_value;

/// Bytes per block: the workload's unit of reads and writes.
pub const BLOCK_SIZE: usize = 4096;
const WORDS: usize = BLOCK_SIZE / 8;
const WORD_BLOCK: usize = 0;
const WORD_GEN: usize = 1;
const WORD_SUM: usize = 2;
/// Multiplier that makes every word different (the same as the memory
/// workload's).
const K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Sets disk blocks' pattern apart from memory pages' (`page_value` is
/// keyed by page index; disk blocks use indexes from 2^31 on).
const DISK_TAG: u64 = 1 << 31;

/// A block buffer, page aligned (a host opening the image with O_DIRECT
/// needs aligned memory; the guest is identity-mapped, so guest alignment
/// is host alignment).
#[repr(C, align(4096))]
pub struct Block(pub [u8; BLOCK_SIZE]);

/// What a block read back turned out to be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Exactly the block and generation expected.
    Good,
    /// A well-formed block of the right number but another generation.
    Stale { found_gen: u64 },
    /// A well-formed block with another block's number.
    Misplaced { found_block: u64 },
    /// Neither: the checksum does not match the content.
    Corrupt,
}

impl Verdict {
    pub fn kind(self) -> &'static str {
        match self {
            Verdict::Good => "good",
            Verdict::Stale { .. } => "stale",
            Verdict::Misplaced { .. } => "misplaced",
            Verdict::Corrupt => "corrupt",
        }
    }
}

fn word(buf: &Block, j: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf.0[j * 8..j * 8 + 8]);
    u64::from_le_bytes(w)
}

fn set_word(buf: &mut Block, j: usize, v: u64) {
    buf.0[j * 8..j * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

fn pattern(block: u64, gen: u64, j: usize) -> u64 {
    page_value(DISK_TAG | block, gen) ^ (j as u64).wrapping_mul(K)
}

/// The checksum over every word but the checksum's own.
fn checksum(buf: &Block) -> u64 {
    let mut sum = K;
    for j in (0..WORDS).filter(|&j| j != WORD_SUM) {
        sum = (sum ^ word(buf, j)).wrapping_mul(K).rotate_left(29);
    }
    sum
}

/// Fills `buf` with block `block` of generation `gen`.
pub fn fill(buf: &mut Block, block: u64, gen: u64) {
    set_word(buf, WORD_BLOCK, block);
    set_word(buf, WORD_GEN, gen);
    for j in WORD_SUM + 1..WORDS {
        set_word(buf, j, pattern(block, gen, j));
    }
    let sum = checksum(buf);
    set_word(buf, WORD_SUM, sum);
}

/// Checks that `buf` holds block `block` of generation `gen`.
pub fn check(buf: &Block, block: u64, gen: u64) -> Verdict {
    let found_block = word(buf, WORD_BLOCK);
    let found_gen = word(buf, WORD_GEN);
    let well_formed = checksum(buf) == word(buf, WORD_SUM)
        && (WORD_SUM + 1..WORDS).all(|j| word(buf, j) == pattern(found_block, found_gen, j));
    match (well_formed, found_block == block, found_gen == gen) {
        (true, true, true) => Verdict::Good,
        (true, true, false) => Verdict::Stale { found_gen },
        (true, false, _) => Verdict::Misplaced { found_block },
        (false, _, _) => Verdict::Corrupt,
    }
}
