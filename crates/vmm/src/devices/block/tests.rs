//! The block backend against a synthetic guest memory and a real image
//! file: requests round-trip to the file, out-of-range and read-only
//! requests get an error status with the file untouched, garbage chains
//! are refused with a reason, and every device write into guest memory is
//! in the own-writes bitmap.

use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::image::{Image, ImageSpec};
use super::request::*;
use super::scratch::Scratch;
use super::*;
use crate::memory::GuestRam;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0x30_000;
const DISK_BYTES: u64 = 1 << 20;

struct Rig {
    _dir: Scratch,
    path: PathBuf,
    ram: GuestRam,
    q: Queue,
    backend: Backend,
    /// Avail entries published so far.
    avail: u16,
}

fn rig(tag: &str, readonly: bool) -> Rig {
    let dir = Scratch::new(tag);
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0x5au8; DISK_BYTES as usize]).unwrap();
    let image = Image::open(
        &ImageSpec {
            path: path.clone(),
            readonly,
            expected_size: Some(DISK_BYTES),
        },
        true,
    )
    .unwrap();
    image.activate().unwrap();
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let mut q = Queue::new(256).unwrap();
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(ram.memory()));
    Rig {
        _dir: dir,
        path,
        ram,
        q,
        backend: Backend::new(image, "ferry-disk-0"),
        avail: 0,
    }
}

impl Rig {
    fn mem(&self) -> &GuestMemory {
        self.ram.memory()
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + u64::from(i) * 16;
        let m = self.mem();
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem().write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem().write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem().write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// A three-descriptor request: header, `len` bytes of data at DATA
    /// (device-writable with `write`), status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) {
        self.header(kind, sector);
        self.desc(0, HDR, 16, F_NEXT, 1);
        self.desc(
            1,
            DATA,
            len,
            F_NEXT | if device_writes { F_WRITE } else { 0 },
            2,
        );
        self.desc(2, STATUS, 1, F_WRITE, 0);
        self.publish(0);
    }

    fn publish(&mut self, head: u16) {
        let m = self.ram.memory();
        m.write_obj(
            head,
            GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % SIZE)),
        )
        .unwrap();
        self.avail = self.avail.wrapping_add(1);
        m.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn serve(&mut self) -> Result<Served, Malformed> {
        let mem = self.ram.memory().clone();
        self.backend
            .serve_queue(&mut self.q, &mem, WriteCache::WriteBack)
    }

    fn status(&self) -> u8 {
        self.mem().read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// The used ring's last entry: (head, len).
    fn last_used(&self) -> (u32, u32) {
        let idx: u16 = self.mem().read_obj(GuestAddress(USED + 2)).unwrap();
        let at = USED + 4 + 8 * u64::from(idx.wrapping_sub(1) % SIZE);
        (
            self.mem().read_obj(GuestAddress(at)).unwrap(),
            self.mem().read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn file_untouched(path: &Path) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len() as u64, DISK_BYTES);
    assert!(data.iter().all(|&b| b == 0x5a), "the image changed");
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let mut r = rig("roundtrip", false);
    let data = pattern(8192, 7);
    r.mem().write_slice(&data, GuestAddress(DATA)).unwrap();
    r.request(VIRTIO_BLK_T_OUT, 16, 8192, false);
    let served = r.serve().unwrap();
    assert_eq!((served.requests, served.io_errors), (1, 0));
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.last_used(), (0, 1));
    let file = r.file();
    assert_eq!(&file[16 * 512..16 * 512 + 8192], &data[..]);
    assert!(file[..16 * 512].iter().all(|&b| b == 0x5a));

    // Read it back into cleared memory.
    r.mem()
        .write_slice(&[0u8; 8192], GuestAddress(DATA))
        .unwrap();
    r.request(VIRTIO_BLK_T_IN, 16, 8192, true);
    assert_eq!(r.serve().unwrap().requests, 1);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.last_used(), (0, 8193));
    let mut back = vec![0u8; 8192];
    r.mem().read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    // Nothing more waits.
    assert_eq!(r.serve().unwrap().requests, 0);
}

#[test]
fn the_last_sector_is_in_range_and_the_next_is_not() {
    let mut r = rig("range", false);
    let last = DISK_BYTES / 512 - 1;
    r.request(VIRTIO_BLK_T_IN, last, 512, true);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    for (sector, len) in [
        (last + 1, 512),
        (last, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 4096),
    ] {
        r.request(VIRTIO_BLK_T_OUT, sector, len, false);
        let served = r.serve().unwrap();
        assert_eq!(
            (served.requests, served.io_errors),
            (1, 1),
            "sector {sector}"
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR, "sector {sector}");
        r.request(VIRTIO_BLK_T_IN, sector, len, true);
        r.serve().unwrap();
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR, "sector {sector}");
    }
    // No host harm: the file is as it was, and no larger.
    file_untouched(&r.path);
}

#[test]
fn odd_lengths_and_unknown_types_get_an_error_status() {
    let mut r = rig("odd", false);
    r.request(VIRTIO_BLK_T_OUT, 0, 100, false);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_IOERR);
    r.request(42, 0, 512, false);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP);
    file_untouched(&r.path);
}

#[test]
fn a_read_only_image_refuses_writes() {
    let mut r = rig("readonly", true);
    r.mem()
        .write_slice(&pattern(4096, 1), GuestAddress(DATA))
        .unwrap();
    r.request(VIRTIO_BLK_T_OUT, 0, 4096, false);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_IOERR);
    r.request(VIRTIO_BLK_T_IN, 0, 4096, true);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    file_untouched(&r.path);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig("flush-id", false);
    // FLUSH: header and status only.
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.desc(0, HDR, 16, F_NEXT, 1);
    r.desc(1, STATUS, 1, F_WRITE, 0);
    r.publish(0);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.last_used(), (0, 1));
    r.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);
    r.serve().unwrap();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(r.last_used(), (0, 21));
    let mut id = [0u8; 20];
    r.mem().read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"ferry-disk-0");
    assert!(id[12..].iter().all(|&b| b == 0));
}

#[test]
fn write_through_flushes_every_write() {
    let mut r = rig("write-through", false);
    r.mem()
        .write_slice(&pattern(512, 3), GuestAddress(DATA))
        .unwrap();
    r.request(VIRTIO_BLK_T_OUT, 1, 512, false);
    let mem = r.ram.memory().clone();
    let served = r
        .backend
        .serve_queue(&mut r.q, &mem, WriteCache::WriteThrough)
        .unwrap();
    assert_eq!((served.requests, served.io_errors), (1, 0));
    assert_eq!(&r.file()[512..1024], &pattern(512, 3)[..]);
}

#[test]
fn device_writes_are_in_the_own_writes_bitmap() {
    let mut r = rig("bitmap", false);
    // Clear whatever the set-up wrote.
    for region in r.mem().iter() {
        region.get_mmap().bitmap().reset();
    }
    r.request(VIRTIO_BLK_T_IN, 0, 8192, true);
    // The test's own descriptor writes dirtied pages too: clear again.
    for region in r.mem().iter() {
        region.get_mmap().bitmap().reset();
    }
    r.serve().unwrap();
    let region = r.mem().iter().next().unwrap();
    let bits = region.get_mmap().bitmap().get_and_reset();
    let page = |gpa: u64| {
        let p = (gpa - region.start_addr().0) / 4096;
        bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    };
    assert!(
        page(DATA) && page(DATA + 4096),
        "the data pages are not marked"
    );
    assert!(page(STATUS), "the status page is not marked");
    assert!(page(USED), "the used ring is not marked");
    assert!(
        !page(DATA + 8192),
        "a page the device did not write is marked"
    );
}

#[test]
fn garbage_chains_are_refused_with_a_reason() {
    type Setup = fn(&mut Rig);
    let cases: [(&str, Setup, &str); 7] = [
        (
            "single descriptor",
            |r| {
                r.header(VIRTIO_BLK_T_IN, 0);
                r.desc(0, HDR, 16, 0, 0);
                r.publish(0);
            },
            "needs a header and a status",
        ),
        (
            "device-writable header",
            |r| {
                r.header(VIRTIO_BLK_T_IN, 0);
                r.desc(0, HDR, 16, F_NEXT | F_WRITE, 1);
                r.desc(1, STATUS, 1, F_WRITE, 0);
                r.publish(0);
            },
            "header descriptor",
        ),
        (
            "short header",
            |r| {
                r.header(VIRTIO_BLK_T_IN, 0);
                r.desc(0, HDR, 8, F_NEXT, 1);
                r.desc(1, STATUS, 1, F_WRITE, 0);
                r.publish(0);
            },
            "header descriptor",
        ),
        (
            "read-only status",
            |r| {
                r.header(VIRTIO_BLK_T_FLUSH, 0);
                r.desc(0, HDR, 16, F_NEXT, 1);
                r.desc(1, STATUS, 1, 0, 0);
                r.publish(0);
            },
            "status descriptor",
        ),
        (
            "read into device-readable data",
            |r| r.request(VIRTIO_BLK_T_IN, 0, 512, false),
            "device-readable data",
        ),
        (
            "data outside memory",
            |r| {
                r.header(VIRTIO_BLK_T_IN, 0);
                r.desc(0, HDR, 16, F_NEXT, 1);
                r.desc(1, (2 << 20) - 512, 4096, F_NEXT | F_WRITE, 2);
                r.desc(2, STATUS, 1, F_WRITE, 0);
                r.publish(0);
            },
            "outside guest memory",
        ),
        (
            "avail index far ahead",
            |r| {
                r.mem().write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
            },
            "entries ahead",
        ),
    ];
    for (name, setup, want) in cases {
        let mut r = rig("garbage", false);
        setup(&mut r);
        let err = r.serve().unwrap_err();
        assert!(err.to_string().contains(want), "{name}: {err}");
        // Nothing was returned to the guest, and the image is untouched.
        let used_idx: u16 = r.mem().read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 0, "{name}");
        file_untouched(&r.path);
    }
}

#[test]
fn writes_are_recorded_for_a_disk_copy_once_it_tracks_and_reads_are_not() {
    let mut r = rig("dirty", false);
    let data = pattern(8192, 3);
    r.mem().write_slice(&data, GuestAddress(DATA)).unwrap();
    // Before the copy starts: not recorded.
    r.request(VIRTIO_BLK_T_OUT, 0, 4096, false);
    r.serve().unwrap();
    r.backend.dirty.set_tracking(true);
    // Sectors 16..32 are blocks 2 and 3 of 4 KiB; a read marks nothing.
    r.request(VIRTIO_BLK_T_OUT, 16, 8192, false);
    r.serve().unwrap();
    r.request(VIRTIO_BLK_T_IN, 64, 4096, true);
    r.serve().unwrap();
    assert_eq!(r.backend.dirty.harvest()[0], 0b1100);
    assert_eq!(r.backend.dirty.harvest()[0], 0);
}
