//! The Offer's two forms on the wire. Up to v8 an Offer ended with its
//! features; v9 added the VM's disks. Postcard is not self-describing and
//! a decoder refuses trailing bytes, so an older destination could not read
//! an offer with a disk list, even an empty one. An offer without disks is
//! therefore sent in the older form (every version reads it, and a VM
//! without a disk keeps migrating to older hosts); one with disks in the
//! newer form, which only a v9 destination is ever sent (the source checks
//! the version first). The reader tries the newer form, then the older:
//! neither form's bytes parse as the other.

use serde::{Deserialize, Serialize};

use super::frame::FrameKind;
use super::messages::{decode as decode_as, encode as encode_as, DiskOffer, Offer, RamRange};
use crate::error::ProtocolError;

/// The fields both forms share, borrowed for encoding.
#[derive(Serialize)]
struct SharedFields<'a> {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: &'a [RamRange],
    tsc_khz: u32,
    cpuid: &'a [u8],
    features: &'a [String],
}

/// The offer as v1 to v8 send it.
#[derive(Deserialize)]
struct OlderForm {
    mem_bytes: u64,
    vcpus: u32,
    ram_ranges: Vec<RamRange>,
    tsc_khz: u32,
    cpuid: Vec<u8>,
    features: Vec<String>,
}

pub(super) fn encode(offer: &Offer) -> Vec<u8> {
    if offer.disks.is_empty() {
        encode_as(&SharedFields {
            mem_bytes: offer.mem_bytes,
            vcpus: offer.vcpus,
            ram_ranges: &offer.ram_ranges,
            tsc_khz: offer.tsc_khz,
            cpuid: &offer.cpuid,
            features: &offer.features,
        })
    } else {
        encode_as(offer)
    }
}

pub(super) fn decode(payload: &[u8]) -> Result<Offer, ProtocolError> {
    let newer = decode_as::<Offer>(FrameKind::Offer, payload);
    if newer.is_ok() {
        return newer;
    }
    match decode_as::<OlderForm>(FrameKind::Offer, payload) {
        Ok(o) => Ok(Offer {
            mem_bytes: o.mem_bytes,
            vcpus: o.vcpus,
            ram_ranges: o.ram_ranges,
            tsc_khz: o.tsc_khz,
            cpuid: o.cpuid,
            features: o.features,
            disks: Vec::<DiskOffer>::new(),
        }),
        // The newer form's complaint says more about a damaged offer.
        Err(_) => newer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(disks: Vec<DiskOffer>) -> Offer {
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
        }
    }

    #[test]
    fn an_offer_without_disks_is_what_older_versions_send() {
        let o = offer(Vec::new());
        let bytes = encode(&o);
        // Exactly the v8 bytes: an older destination reads it.
        let older: OlderForm = decode_as(FrameKind::Offer, &bytes).unwrap();
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
        let older = decode_as::<OlderForm>(FrameKind::Offer, &bytes);
        assert!(older.is_err(), "a v8 reader must not take a disk offer");
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
