//! virtio-blk requests (virtio 1.2, 5.2.6): a descriptor chain is a
//! 16-byte header the device reads (type, reserved, sector), data
//! descriptors (device-writable for IN and GET_ID, device-readable for
//! OUT), and a device-writable status byte at the end. [`process`] takes
//! one chain, does what it asks against the image and writes the status.
//!
//! Two kinds of failure, kept apart: a request the device understands but
//! cannot serve (beyond the disk's end, a write to a read-only disk, an
//! I/O error, an odd length) gets VIRTIO_BLK_S_IOERR and the host is not
//! touched; a chain that is not a request at all (no header, a status the
//! device may not write, data in the wrong direction, memory outside the
//! guest, more data than any request may carry) is [`Malformed`], and the
//! device stops until the driver resets it.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::dirty::DirtyBlocks;
use super::image::{Bounce, Image};
use crate::memory::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
/// Most data bytes one request may carry (the device's `size_max` times
/// `seg_max` is far below it; a chain beyond is garbage).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_BYTES: u32 = 16;

/// A chain that is not a virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed virtio-blk request (descriptor chain {head}): {why}")]
pub struct Malformed {
    pub head: u16,
    pub why: String,
}

/// Whether a write is on the storage before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCache {
    /// The driver negotiated FLUSH: writes are acknowledged once the image
    /// has them; FLUSH makes them durable.
    WriteBack,
    /// No FLUSH negotiated (virtio 1.2, 5.2.6.2: the device must then
    /// commit every write before completing it): every write is followed
    /// by fdatasync, like FUA.
    WriteThrough,
}

/// What the device learns from a request, for its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Done {
    /// The head index to hand back in the used ring.
    pub head: u16,
    /// Bytes written into guest memory (data and status): the used length.
    pub used_len: u32,
    pub status: u8,
    /// Whether the request wrote the image (and so marked dirty blocks).
    pub wrote_image: bool,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// A parsed chain.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Segment>,
    data_len: usize,
    status: GuestAddress,
}

fn parse<M>(chain: DescriptorChain<M>, memory: &GuestMemory) -> Result<Request, Malformed>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    let bad = |why: String| Malformed { head, why };
    let descs: Vec<_> = chain.collect();
    if descs.len() < 2 {
        return Err(bad(format!(
            "{} descriptor(s): a request needs a header and a status",
            descs.len()
        )));
    }
    for d in &descs {
        if !memory.check_range(d.addr(), d.len() as usize) {
            return Err(bad(format!(
                "descriptor {:#x}+{:#x} lies outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
    }
    let header = descs[0];
    if header.is_write_only() || header.len() < HEADER_BYTES {
        return Err(bad(format!(
            "the header descriptor is {} and {} bytes (want device-readable, at least 16)",
            if header.is_write_only() {
                "device-writable"
            } else {
                "device-readable"
            },
            header.len()
        )));
    }
    let kind: u32 = memory
        .read_obj(header.addr())
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let sector: u64 = memory
        .read_obj(header.addr().unchecked_add(8))
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let status = descs[descs.len() - 1];
    if !status.is_write_only() || status.len() == 0 {
        return Err(bad(
            "the status descriptor is not a device-writable byte".into()
        ));
    }
    // The status is the last byte of the last descriptor.
    let status_addr = status.addr().unchecked_add(u64::from(status.len()) - 1);
    let mut data = Vec::new();
    let mut data_len = 0usize;
    let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let mut push = |addr: GuestAddress, len: usize, writable: bool| {
        if len == 0 {
            return Ok(());
        }
        if matches!(
            kind,
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID
        ) && writable != device_writes
        {
            return Err(bad(format!(
                "a {} data descriptor at {:#x} in a {} request",
                if writable {
                    "device-writable"
                } else {
                    "device-readable"
                },
                addr.0,
                if device_writes { "read" } else { "write" }
            )));
        }
        data_len += len;
        if data_len > MAX_REQUEST_BYTES {
            return Err(bad(format!(
                "more than {MAX_REQUEST_BYTES} bytes of data in one request"
            )));
        }
        data.push(Segment { addr, len });
        Ok(())
    };
    // Data after the header in the header's own descriptor (a driver may
    // put the header and an OUT payload together).
    if header.len() > HEADER_BYTES {
        push(
            header.addr().unchecked_add(u64::from(HEADER_BYTES)),
            (header.len() - HEADER_BYTES) as usize,
            false,
        )?;
    }
    for d in &descs[1..descs.len() - 1] {
        push(d.addr(), d.len() as usize, d.is_write_only())?;
    }
    // Data before the status byte in the status's own descriptor.
    if status.len() > 1 {
        push(status.addr(), status.len() as usize - 1, true)?;
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status: status_addr,
    })
}

/// Does what `chain` asks against `image` (data through `bounce`, which
/// must hold [`MAX_REQUEST_BYTES`]), writes the status byte and says what
/// to put in the used ring. `id` is the GET_ID answer; every write that
/// returned (even with an error: part of it may be on the image) is marked
/// in `dirty`.
pub fn process<M>(
    chain: DescriptorChain<M>,
    memory: &GuestMemory,
    image: &Image,
    cache: WriteCache,
    id: &[u8; ID_BYTES],
    bounce: &mut Bounce,
    dirty: &DirtyBlocks,
) -> Result<Done, Malformed>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let head = chain.head_index();
    let req = parse(chain, memory)?;
    let bad = |why: String| Malformed { head, why };
    let mut written = 0u32;
    let mut wrote_image = false;
    let status = match req.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => match range(&req, image) {
            None => VIRTIO_BLK_S_IOERR,
            Some(offset) if req.kind == VIRTIO_BLK_T_IN => {
                match image.read_aligned(bounce, req.data_len, offset) {
                    Ok(()) => {
                        scatter(&req.data, memory, bounce.as_slice()).map_err(bad)?;
                        written = req.data_len as u32;
                        VIRTIO_BLK_S_OK
                    }
                    Err(e) => {
                        tracing::warn!(path = %image.path().display(), offset, len = req.data_len, "disk read failed: {e}");
                        VIRTIO_BLK_S_IOERR
                    }
                }
            }
            Some(_) if image.readonly() => VIRTIO_BLK_S_IOERR,
            Some(offset) => {
                gather(&req.data, memory, bounce.as_mut_slice()).map_err(bad)?;
                let mut result = image.write_aligned(bounce, req.data_len, offset);
                dirty.mark(offset, req.data_len as u64);
                wrote_image = true;
                if result.is_ok() && cache == WriteCache::WriteThrough {
                    result = image.flush().map_err(std::io::Error::other);
                }
                match result {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(e) => {
                        tracing::warn!(path = %image.path().display(), offset, len = req.data_len, "disk write failed: {e}");
                        VIRTIO_BLK_S_IOERR
                    }
                }
            }
        },
        VIRTIO_BLK_T_FLUSH => match image.flush() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("{e}");
                VIRTIO_BLK_S_IOERR
            }
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = req.data_len.min(ID_BYTES);
            scatter(&req.data, memory, &id[..n]).map_err(bad)?;
            written = n as u32;
            VIRTIO_BLK_S_OK
        }
        _ => VIRTIO_BLK_S_UNSUPP,
    };
    memory
        .write_obj(status, req.status)
        .map_err(|e| bad(format!("writing the status byte: {e}")))?;
    Ok(Done {
        head,
        used_len: written + 1,
        status,
        wrote_image,
    })
}

/// The byte offset of an IN/OUT request if it is whole sectors inside the
/// image.
fn range(req: &Request, image: &Image) -> Option<u64> {
    if req.data_len == 0 || req.data_len as u64 % SECTOR_SIZE != 0 {
        return None;
    }
    let offset = req.sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(req.data_len as u64)?;
    (end <= image.size()).then_some(offset)
}

/// Copies `from` into the guest's segments, in order.
fn scatter(segments: &[Segment], memory: &GuestMemory, from: &[u8]) -> Result<(), String> {
    let mut at = 0;
    for s in segments {
        if at >= from.len() {
            break;
        }
        let n = s.len.min(from.len() - at);
        memory
            .write_slice(&from[at..at + n], s.addr)
            .map_err(|e| format!("writing guest memory at {:#x}: {e}", s.addr.0))?;
        at += n;
    }
    Ok(())
}

/// Copies the guest's segments into `into`, in order.
fn gather(segments: &[Segment], memory: &GuestMemory, into: &mut [u8]) -> Result<(), String> {
    let mut at = 0;
    for s in segments {
        memory
            .read_slice(&mut into[at..at + s.len], s.addr)
            .map_err(|e| format!("reading guest memory at {:#x}: {e}", s.addr.0))?;
        at += s.len;
    }
    Ok(())
}
