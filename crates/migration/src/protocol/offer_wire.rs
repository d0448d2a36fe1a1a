//! The Offer's three forms on the wire. Up to v8 an Offer ended with its
//! features; v9 added the VM's disks; v10 whether the source copies them.
//! Postcard is not self-describing and a decoder refuses trailing bytes,
//! so an older destination cannot read a newer form, even one whose new
//! fields are empty. Each offer is therefore sent in the oldest form that
//! holds it: without disks in the v8 form (every version reads it, and a
//! VM without a disk keeps migrating to older hosts), with disks on shared
//! storage in the v9 form, and with copied disks in the v10 form, which
//! only a v10 destination is ever sent (the source checks the version
//! first). The reader tries the newest form first: each form is the one
//! before with fields appended, so an older form's bytes end too early to
//! parse as a newer one, and a newer form's leave bytes over in an older.

use serde::{Deserialize, Serialize};

use super::frame::FrameKind;
use super::messages::{decode as decode_as, encode as encode_as, DiskOffer, Offer, RamRange};
use crate::error::ProtocolError;

/// The fields of the v8 form, borrowed for encoding.
#[derive(Serialize)]
struct SharedFields<'a> {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: &'a [RamRange],
    tsc_khz: u32,
    cpuid: &'a [u8],
    features: &'a [String],
}

/// The fields of the v9 form, borrowed for encoding.
#[derive(Serialize)]
struct SharedFieldsWithDisks<'a> {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: &'a [RamRange],
    tsc_khz: u32,
    cpuid: &'a [u8],
    features: &'a [String],
    disks: &'a [DiskOffer],
}

/// The offer as v1 to v8 send it.
#[derive(Deserialize)]
struct V8Form {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: Vec<RamRange>,
    tsc_khz: u32,
    cpuid: Vec<u8>,
    features: Vec<String>,
}

/// The offer as v9 sends it.
#[derive(Deserialize)]
struct V9Form {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: Vec<RamRange>,
    tsc_khz: u32,
    cpuid: Vec<u8>,
    features: Vec<String>,
    disks: Vec<DiskOffer>,
}

pub(super) fn encode(offer: &Offer) -> Vec<u8> {
    if offer.copies_disks {
        encode_as(offer)
    } else if !offer.disks.is_empty() {
        encode_as(&SharedFieldsWithDisks {
            mem_bytes: offer.mem_bytes,
            vcpus: offer.vcpus,
            ram_ranges: &offer.ram_ranges,
            tsc_khz: offer.tsc_khz,
            cpuid: &offer.cpuid,
            features: &offer.features,
            disks: &offer.disks,
        })
    } else {
        encode_as(&SharedFields {
            mem_bytes: offer.mem_bytes,
            vcpus: offer.vcpus,
            ram_ranges: &offer.ram_ranges,
            tsc_khz: offer.tsc_khz,
            cpuid: &offer.cpuid,
            features: &offer.features,
        })
    }
}

pub(super) fn decode(payload: &[u8]) -> Result<Offer, ProtocolError> {
    let newest = decode_as::<Offer>(FrameKind::Offer, payload);
    if newest.is_ok() {
        return newest;
    }
    if let Ok(o) = decode_as::<V9Form>(FrameKind::Offer, payload) {
        return Ok(Offer {
            mem_bytes: o.mem_bytes,
            vcpus: o.vcpus,
            ram_ranges: o.ram_ranges,
            tsc_khz: o.tsc_khz,
            cpuid: o.cpuid,
            features: o.features,
            disks: o.disks,
            copies_disks: false,
        });
    }
    match decode_as::<V8Form>(FrameKind::Offer, payload) {
        Ok(o) => Ok(Offer {
            mem_bytes: o.mem_bytes,
            vcpus: o.vcpus,
            ram_ranges: o.ram_ranges,
            tsc_khz: o.tsc_khz,
            cpuid: o.cpuid,
            features: o.features,
            disks: Vec::new(),
            copies_disks: false,
        }),
        // The newest form's complaint says more about a damaged offer.
        Err(_) => newest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(disks: Vec<DiskOffer>) -> Offer {
        offer_copying(disks, false)
    }

    fn offer_copying(disks: Vec<DiskOffer>, copies_disks: bool) -> Offer {
        Offer {
            mem_bytes: 1 << 30,
            vcpus: 2,
            ram_ranges: vec![RamRange {
                gpa: 0,
                len: 1 << 30,
            }],
            tsc_khz: 2_000_000,
            cpuid: vec![1, 2, 3],
            features: vec!["irqchip".into(), "virtio-blk".into()],
            disks,
            copies_disks,
        }
    }

    #[test]
    fn an_offer_without_disks_is_what_older_versions_send() {
        let o = offer(Vec::new());
        let bytes = encode(&o);
        // Exactly the v8 bytes: an older destination reads it.
        let older: V8Form = decode_as(FrameKind::Offer, &bytes).unwrap();
        assert_eq!(older.features, o.features);
        assert_eq!(decode(&bytes).unwrap(), o);
    }

    #[test]
    fn an_offer_with_disks_round_trips_and_an_older_reader_refuses_it() {
        let o = offer(vec![DiskOffer {
            path: "/srv/shared/vm1.img".into(),
            bytes: 64 << 20,
            readonly: false,
        }]);
        let bytes = encode(&o);
        assert_eq!(decode(&bytes).unwrap(), o);
        let older = decode_as::<V8Form>(FrameKind::Offer, &bytes);
        assert!(older.is_err(), "a v8 reader must not take a disk offer");
        // Exactly the v9 bytes: a v9 destination reads a shared-storage VM.
        let v9: V9Form = decode_as(FrameKind::Offer, &bytes).unwrap();
        assert_eq!(v9.disks, o.disks);
    }

    #[test]
    fn an_offer_copying_its_disk_round_trips_and_older_readers_refuse_it() {
        let o = offer_copying(
            vec![DiskOffer {
                path: "/var/lib/ferry/vm1.img".into(),
                bytes: 64 << 20,
                readonly: false,
            }],
            true,
        );
        let bytes = encode(&o);
        assert_eq!(decode(&bytes).unwrap(), o);
        assert!(decode_as::<V9Form>(FrameKind::Offer, &bytes).is_err());
        assert!(decode_as::<V8Form>(FrameKind::Offer, &bytes).is_err());
        assert_eq!(
            o.copied_disk_ranges(),
            vec![RamRange {
                gpa: super::super::messages::DISK_COPY_BASE,
                len: 64 << 20
            }]
        );
        assert_eq!(o.migrated_ranges().len(), 2);
        o.validate().unwrap();
    }

    #[test]
    fn a_copied_disk_that_is_not_whole_pages_is_an_invalid_offer() {
        let o = offer_copying(
            vec![DiskOffer {
                path: "/var/lib/ferry/odd.img".into(),
                bytes: (64 << 20) + 512,
                readonly: false,
            }],
            true,
        );
        assert!(o.validate().is_err());
    }

    #[test]
    fn a_damaged_offer_is_malformed() {
        let mut bytes = encode(&offer(Vec::new()));
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode(&bytes),
            Err(ProtocolError::Malformed { .. })
        ));
    }
}
