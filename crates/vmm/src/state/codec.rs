//! The state record's binary container: a magic, a format version, then
//! sections, each with its own id, version, length and CRC-32, so a flipped
//! byte anywhere is caught and named, and one section can evolve without
//! making old records unreadable. Lengths are capped before anything is
//! allocated: a hostile or broken peer cannot make us allocate without bound.
//!
//! ```text
//! "FERRYSTA" | u16 format | u16 sections | { u16 id | u16 version | u32 len | u32 crc | payload }* | u32 crc of all before
//! ```
//!
//! The trailing CRC covers the headers too, so even a flipped version
//! number that would still be accepted is caught.
//! Payloads are serde values in postcard's compact encoding.

use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: &[u8; 8] = b"FERRYSTA";
/// The container's own layout; bumped only if the framing above changes.
pub const FORMAT_VERSION: u16 = 1;
/// No record is bigger than this (1024 vCPUs at ~10 KiB each fit well).
pub const MAX_RECORD_BYTES: usize = 32 << 20;
const HEADER: usize = 8 + 2 + 2;
const SECTION_HEADER: usize = 2 + 2 + 4 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("not a Ferry state record (bad magic)")]
    BadMagic,
    #[error("state record format {found} is not supported (this Ferry reads format {supported})")]
    UnsupportedFormat { found: u16, supported: u16 },
    #[error("state record is truncated (in {0})")]
    Truncated(&'static str),
    #[error("state record is {0} bytes, more than the {MAX_RECORD_BYTES} allowed")]
    TooLarge(usize),
    #[error("state section {0} is corrupt (checksum mismatch)")]
    Checksum(String),
    #[error(
        "state section {id} version {found} is not supported (this Ferry reads up to {supported})"
    )]
    SectionVersion {
        id: String,
        found: u16,
        supported: u16,
    },
    #[error("state section {0} is missing")]
    Missing(String),
    #[error("state section {0} appears twice")]
    Duplicate(String),
    #[error("state section with unknown id {0}: written by a newer Ferry?")]
    UnknownSection(u16),
    #[error("state section {section} does not decode: {reason}")]
    Decode { section: String, reason: String },
    #[error("{0} bytes follow the last state section")]
    TrailingBytes(usize),
}

/// A section's identity and the newest version of it this build writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionId {
    pub id: u16,
    pub name: &'static str,
    pub version: u16,
}

pub struct Writer {
    out: Vec<u8>,
    count: u16,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(16 << 10);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        Self { out, count: 0 }
    }

    pub fn section<T: Serialize>(&mut self, id: SectionId, value: &T) {
        let payload = postcard::to_stdvec(value).expect("state values always serialize");
        self.out.extend_from_slice(&id.id.to_le_bytes());
        self.out.extend_from_slice(&id.version.to_le_bytes());
        self.out
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out
            .extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        self.out.extend_from_slice(&payload);
        self.count += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out[10..12].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.out);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out
    }
}

/// A checked section, still encoded.
pub struct RawSection<'a> {
    pub id: u16,
    pub version: u16,
    pub payload: &'a [u8],
}

/// Splits and checks a record: magic, format, every length and checksum.
pub fn read_sections(bytes: &[u8]) -> Result<Vec<RawSection<'_>>, CodecError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    if bytes.len() < HEADER + 4 {
        return Err(if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            CodecError::BadMagic
        } else {
            CodecError::Truncated("header")
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let format = u16::from_le_bytes([bytes[8], bytes[9]]);
    if format != FORMAT_VERSION {
        return Err(CodecError::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let (bytes, tail) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(bytes) != u32::from_le_bytes(tail.try_into().unwrap()) {
        // Say which section is bad when one is; otherwise the headers are.
        return Err(
            first_bad_section(bytes).unwrap_or_else(|| CodecError::Checksum("headers".into()))
        );
    }
    let count = u16::from_le_bytes([bytes[10], bytes[11]]);
    let mut at = HEADER;
    let mut sections = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        let head = bytes
            .get(at..at + SECTION_HEADER)
            .ok_or(CodecError::Truncated("section header"))?;
        let id = u16::from_le_bytes([head[0], head[1]]);
        let version = u16::from_le_bytes([head[2], head[3]]);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(head[8..12].try_into().unwrap());
        at += SECTION_HEADER;
        let payload = bytes
            .get(
                at..at
                    .checked_add(len)
                    .ok_or(CodecError::Truncated("section"))?,
            )
            .ok_or(CodecError::Truncated("section payload"))?;
        if crc32fast::hash(payload) != crc {
            return Err(CodecError::Checksum(format!("id {id}")));
        }
        at += len;
        sections.push(RawSection {
            id,
            version,
            payload,
        });
    }
    if at != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - at));
    }
    Ok(sections)
}

/// Walks the sections without trusting the record checksum, to name the
/// first one whose own checksum fails (or that is cut short).
fn first_bad_section(bytes: &[u8]) -> Option<CodecError> {
    let count = u16::from_le_bytes([bytes[10], bytes[11]]);
    let mut at = HEADER;
    for _ in 0..count {
        let Some(head) = bytes.get(at..at + SECTION_HEADER) else {
            return Some(CodecError::Truncated("section header"));
        };
        let id = u16::from_le_bytes([head[0], head[1]]);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(head[8..12].try_into().unwrap());
        at += SECTION_HEADER;
        let Some(payload) = at.checked_add(len).and_then(|end| bytes.get(at..end)) else {
            return Some(CodecError::Truncated("section payload"));
        };
        if crc32fast::hash(payload) != crc {
            return Some(CodecError::Checksum(format!("id {id}")));
        }
        at += len;
    }
    None
}

/// Finds section `id` exactly once and decodes it, accepting any version
/// from 1 up to the one this build writes.
pub fn take<T: DeserializeOwned>(
    sections: &[RawSection<'_>],
    id: SectionId,
) -> Result<T, CodecError> {
    let mut found = sections.iter().filter(|s| s.id == id.id);
    let section = found
        .next()
        .ok_or_else(|| CodecError::Missing(id.name.into()))?;
    if found.next().is_some() {
        return Err(CodecError::Duplicate(id.name.into()));
    }
    if section.version == 0 || section.version > id.version {
        return Err(CodecError::SectionVersion {
            id: id.name.into(),
            found: section.version,
            supported: id.version,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(section.payload).map_err(|e| CodecError::Decode {
            section: id.name.into(),
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CodecError::Decode {
            section: id.name.into(),
            reason: format!("{} unexpected trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

/// Refuses section ids this build does not know.
pub fn reject_unknown(sections: &[RawSection<'_>], known: &[SectionId]) -> Result<(), CodecError> {
    match sections
        .iter()
        .find(|s| !known.iter().any(|k| k.id == s.id))
    {
        Some(s) => Err(CodecError::UnknownSection(s.id)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SectionId = SectionId {
        id: 1,
        name: "a",
        version: 2,
    };
    const B: SectionId = SectionId {
        id: 2,
        name: "b",
        version: 1,
    };

    fn record() -> Vec<u8> {
        let mut w = Writer::new();
        w.section(A, &(42u64, "hello".to_string()));
        w.section(B, &vec![1u8, 2, 3]);
        w.finish()
    }

    #[test]
    fn round_trip() {
        let bytes = record();
        let s = read_sections(&bytes).unwrap();
        reject_unknown(&s, &[A, B]).unwrap();
        let a: (u64, String) = take(&s, A).unwrap();
        let b: Vec<u8> = take(&s, B).unwrap();
        assert_eq!(a, (42, "hello".into()));
        assert_eq!(b, vec![1, 2, 3]);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = record();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let outcome = read_sections(&bad).and_then(|s| {
                reject_unknown(&s, &[A, B])?;
                take::<(u64, String)>(&s, A)?;
                take::<Vec<u8>>(&s, B)
            });
            assert!(outcome.is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let bytes = record();
        for len in 0..bytes.len() {
            assert!(
                read_sections(&bytes[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
    }

    #[test]
    fn newer_versions_and_unknown_sections_are_refused() {
        let mut w = Writer::new();
        w.section(SectionId { version: 3, ..A }, &(1u64, String::new()));
        w.section(
            SectionId {
                id: 9,
                name: "x",
                version: 1,
            },
            &0u8,
        );
        let bytes = w.finish();
        let s = read_sections(&bytes).unwrap();
        assert!(matches!(
            take::<(u64, String)>(&s, A),
            Err(CodecError::SectionVersion { .. })
        ));
        assert_eq!(
            reject_unknown(&s, &[A, B]),
            Err(CodecError::UnknownSection(9))
        );
        assert_eq!(
            take::<Vec<u8>>(&s, B).unwrap_err(),
            CodecError::Missing("b".into())
        );
        let mut future = bytes.clone();
        future[8] = 2;
        assert!(matches!(
            read_sections(&future),
            Err(CodecError::UnsupportedFormat { found: 2, .. })
        ));
    }
}
