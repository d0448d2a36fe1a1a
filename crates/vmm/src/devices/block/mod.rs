//! The virtio-blk device's backend: a raw image file (`image`, opened with
//! O_DIRECT where the filesystem allows), its exclusive OFD lock (`lock`),
//! and the requests a driver queues (`request`: IN, OUT, FLUSH, GET_ID).
//! [`serve_queue`] drains a request queue against an image; every write
//! into guest memory goes through vm-memory's `Bytes`, so the VMM's
//! own-writes bitmap marks the pages and migration copies them. Every
//! write into the image is recorded in the device's [`dirty::DirtyBlocks`]
//! once it returned, for a migration that copies the disk
//! (`copy_source` on this side, `copy_target` on the destination).

pub mod copy_hold;
pub mod copy_source;
pub mod copy_target;
pub mod device;
pub mod dirty;
pub mod image;
pub mod lock;
pub mod request;
#[cfg(test)]
mod scratch;
#[cfg(test)]
mod tests;

use std::num::Wrapping;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemory;
use copy_hold::CopyHold;
use dirty::DirtyBlocks;
use image::{Bounce, Image};
use request::{Malformed, WriteCache, ID_BYTES, MAX_REQUEST_BYTES};

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const FLUSH: u64 = 1 << 9;
}

/// Requests served per call before the caller gets control back (a guest
/// that keeps the queue full must not starve a pause).
pub const BATCH: usize = 64;

/// What one [`serve_queue`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Served {
    pub requests: usize,
    pub io_errors: usize,
    /// Whether the driver asked to be told about the used buffers.
    pub notify: bool,
}

/// The request processor of one device: the image, the GET_ID answer,
/// the bounce buffer for O_DIRECT and the record of written blocks.
pub struct Backend {
    pub image: Image,
    id: [u8; ID_BYTES],
    bounce: Bounce,
    pub dirty: Arc<DirtyBlocks>,
    /// Write-blocking, when a copy of the disk asks for it.
    pub hold: Arc<CopyHold>,
}

impl Backend {
    /// `serial` becomes the GET_ID answer (truncated to 20 bytes).
    pub fn new(image: Image, serial: &str) -> Backend {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Backend {
            dirty: Arc::new(DirtyBlocks::new(image.size())),
            hold: Arc::new(CopyHold::default()),
            image,
            id,
            bounce: Bounce::new(MAX_REQUEST_BYTES),
        }
    }

    /// Serves up to [`BATCH`] requests waiting in `queue`.
    pub fn serve_queue(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemory,
        cache: WriteCache,
    ) -> Result<Served, Malformed> {
        let broken = |why: String| Malformed { head: 0, why };
        let mut served = Served::default();
        while served.requests < BATCH {
            let avail: u16 = memory
                .read_obj(GuestAddress(queue.avail_ring()).unchecked_add(2))
                .map_err(|e| broken(format!("reading the avail index: {e}")))?;
            let waiting = (Wrapping(avail) - Wrapping(queue.next_avail())).0;
            if waiting == 0 {
                break;
            }
            if waiting > queue.size() {
                return Err(broken(format!(
                    "the avail index {avail} is {waiting} entries ahead of the device, more than the ring's {}",
                    queue.size()
                )));
            }
            let chain = queue
                .iter(memory)
                .map_err(|e| broken(e.to_string()))?
                .next()
                .ok_or_else(|| broken("an avail ring entry could not be read".into()))?;
            if chain.head_index() >= queue.size() {
                return Err(broken(format!(
                    "descriptor head {} is outside the ring",
                    chain.head_index()
                )));
            }
            let done = request::process(
                chain,
                memory,
                &self.image,
                cache,
                &self.id,
                &mut self.bounce,
                &self.dirty,
            )?;
            if done.status != request::VIRTIO_BLK_S_OK {
                served.io_errors += 1;
            }
            // Write-blocking: the guest learns of its write only once the
            // copy has sent the block.
            if done.wrote_image {
                if let Some(ticket) = self.hold.ticket(&self.dirty) {
                    self.hold.wait(ticket);
                }
            }
            queue
                .add_used(memory, done.head, done.used_len)
                .map_err(|e| broken(format!("returning a request: {e}")))?;
            served.requests += 1;
        }
        if served.requests > 0 {
            served.notify = queue
                .needs_notification(memory)
                .map_err(|e| broken(e.to_string()))?;
        }
        Ok(served)
    }
}
