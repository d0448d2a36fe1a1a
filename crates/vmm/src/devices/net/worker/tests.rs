//! Garbage from the driver: every kind of bad descriptor is refused with a
//! reason (the worker then marks the device DEVICE_NEEDS_RESET), and
//! nothing panics.

use vm_memory::GuestAddress;

use super::*;
use crate::memory::GuestRam;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn setup() -> (GuestRam, Queue) {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let mut q = Queue::new(256).unwrap();
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(ram.memory()));
    (ram, q)
}

fn desc(ram: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let m = ram.memory();
    let at = DESC + u64::from(i) * 16;
    m.write_obj(addr, GuestAddress(at)).unwrap();
    m.write_obj(len, GuestAddress(at + 8)).unwrap();
    m.write_obj(flags, GuestAddress(at + 12)).unwrap();
    m.write_obj(next, GuestAddress(at + 14)).unwrap();
}

/// Makes `heads` available, with the avail index set to `idx`.
fn avail(ram: &GuestRam, heads: &[u16], idx: u16) {
    let m = ram.memory();
    for (i, h) in heads.iter().enumerate() {
        m.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    m.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
}

#[test]
fn a_good_chain_is_taken() {
    let (ram, mut q) = setup();
    desc(&ram, 0, 0x10_000, 12, F_WRITE | F_NEXT, 1);
    desc(&ram, 1, 0x10_100, 1514, F_WRITE, 0);
    avail(&ram, &[0], 1);
    let (head, segs) = next_chain(ram.memory(), &mut q, true).unwrap().unwrap();
    assert_eq!(head, 0);
    assert_eq!(segs.len(), 2);
    assert!(next_chain(ram.memory(), &mut q, true).unwrap().is_none());
}

#[test]
fn a_descriptor_outside_guest_memory_is_refused() {
    let (ram, mut q) = setup();
    desc(&ram, 0, 0x7fff_0000, 1536, F_WRITE, 0);
    avail(&ram, &[0], 1);
    let err = next_chain(ram.memory(), &mut q, true).unwrap_err();
    assert!(err.contains("outside guest memory"), "{err}");
    // One that starts inside and runs past the end, too.
    let (ram, mut q) = setup();
    desc(&ram, 0, (2 << 20) - 100, 1536, F_WRITE, 0);
    avail(&ram, &[0], 1);
    assert!(next_chain(ram.memory(), &mut q, true).is_err());
}

#[test]
fn a_descriptor_of_the_wrong_direction_is_refused() {
    let (ram, mut q) = setup();
    desc(&ram, 0, 0x10_000, 100, 0, 0);
    avail(&ram, &[0], 1);
    let err = next_chain(ram.memory(), &mut q, true).unwrap_err();
    assert!(err.contains("device-readable"), "{err}");
}

#[test]
fn an_avail_index_far_ahead_is_refused() {
    let (ram, mut q) = setup();
    avail(&ram, &[], SIZE + 5);
    let err = next_chain(ram.memory(), &mut q, false).unwrap_err();
    assert!(err.contains("ahead"), "{err}");
}

#[test]
fn a_head_outside_the_ring_is_refused() {
    let (ram, mut q) = setup();
    avail(&ram, &[SIZE + 3], 1);
    assert!(next_chain(ram.memory(), &mut q, false).is_err());
}

#[test]
fn a_chain_longer_than_any_frame_is_refused() {
    let (ram, mut q) = setup();
    for i in 0..SIZE {
        let flags = if i + 1 < SIZE { F_NEXT } else { 0 };
        desc(&ram, i, 0x10_000, 65_535, flags, i + 1);
    }
    avail(&ram, &[0], 1);
    let err = next_chain(ram.memory(), &mut q, false).unwrap_err();
    assert!(err.contains("more than"), "{err}");
}

#[test]
fn a_looping_chain_ends_and_is_refused_when_empty() {
    let (ram, mut q) = setup();
    // 0 -> 1 -> 0 -> ...: virtio-queue cuts it at the ring size; each
    // descriptor has length 0, so nothing is left to use.
    desc(&ram, 0, 0x10_000, 0, F_NEXT, 1);
    desc(&ram, 1, 0x10_000, 0, F_NEXT, 0);
    avail(&ram, &[0], 1);
    let err = next_chain(ram.memory(), &mut q, false).unwrap_err();
    assert!(err.contains("empty or broken"), "{err}");
}
