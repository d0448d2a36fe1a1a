//! The memory virtio-drivers needs from the platform: DMA pages for the
//! virtqueues, and the address the device sees for a buffer. The guest is
//! identity-mapped (guest-physical = virtual), so sharing a buffer is
//! handing over its address; the queues come from a small page pool in
//! .bss (the workload lives after the image, so .bss is safe from it).
//! The pool is never given back: the driver lives for the whole run.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Pages in the pool: the network's two virtqueues of 64 entries need 4
/// (2 each, legacy or modern layout), the disk's one queue of 16 entries
/// 2; the rest is slack.
const POOL_PAGES: usize = 8;

#[repr(C, align(4096))]
struct Pool(UnsafeCell<[u8; POOL_PAGES * PAGE_SIZE]>);

// SAFETY: pages are handed out at most once each (NEXT only grows), so no
// two users ever share a byte of the pool.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([0; POOL_PAGES * PAGE_SIZE]));
/// Pages of the pool handed out so far.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The [`Hal`] of an identity-mapped guest with a static DMA pool.
pub struct IdentityHal;

// SAFETY: dma_alloc returns page-aligned, zeroed pages of the static pool
// that are never handed out twice; addresses are identity-mapped, so the
// physical address is the pointer's value, valid for the device as for us.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let first = NEXT.fetch_add(pages, Ordering::Relaxed);
        if first.saturating_add(pages) > POOL_PAGES {
            // Dma::new turns a zero address into Error::DmaError.
            return (0, NonNull::dangling());
        }
        let base = POOL.0.get().cast::<u8>();
        // SAFETY: [first, first + pages) lies inside the pool (checked
        // above) and belongs to this caller alone.
        let ptr = unsafe { base.add(first * PAGE_SIZE) };
        // SAFETY: as above; the pages are ours to zero.
        unsafe { ptr.write_bytes(0, pages * PAGE_SIZE) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| unreachable!());
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // The queues live for the whole run; their pages are not reused.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Only the PCI transport calls this; identity mapping either way.
        NonNull::new(paddr as *mut u8).unwrap_or_else(|| unreachable!())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // The device wrote straight into the buffer: nothing to copy back.
    }
}
