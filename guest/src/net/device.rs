//! The virtio-net card as smoltcp sees it: a polled `phy::Device` over
//! virtio-drivers' `VirtIONetRaw`, with every buffer in .bss.
//!
//! Receive: all [`RX_BUFS`] buffers are posted at start. A used one is
//! handed to smoltcp in place (no copy) and goes back to the device in
//! batches of [`RX_REPOST_BATCH`], so the device is notified (when it asks
//! to be) once per batch rather than once per frame, and always holds at
//! least `RX_BUFS - RX_REPOST_BATCH` buffers. Transmit: a frame is built
//! in one of [`TX_BUFS`] buffers behind its virtio-net header and queued;
//! buffers come back when the device has used them. Notifications are
//! deferred to the end of the poll (see `notify`).
//!
//! The device is trusted no further than it must be: a used-ring entry
//! naming a descriptor we did not post, or a length beyond the buffer, is
//! counted as an error and dropped, never a fault.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;

use super::notify::DeferredNotify;
use crate::sync::Exclusive;
use crate::virtio::hal::IdentityHal;

/// Entries per virtqueue (both queues): the device must offer at least this.
pub const QUEUE_SIZE: usize = 64;
const RX_BUFS: usize = QUEUE_SIZE;
const TX_BUFS: usize = 32;
const RX_REPOST_BATCH: usize = 16;
/// One Ethernet frame of 1514 bytes behind a header of at most 12 (the
/// driver requires at least 1526 for a receive buffer).
const BUF_LEN: usize = 1536;
/// Largest frame smoltcp may build (Ethernet header + 1500).
const MAX_FRAME: usize = 1514;
const NO_SLOT: u8 = u8::MAX;

type Driver = VirtIONetRaw<IdentityHal, DeferredNotify, QUEUE_SIZE>;

/// The buffers, in .bss.
pub struct Buffers {
    rx: [[u8; BUF_LEN]; RX_BUFS],
    tx: [[u8; BUF_LEN]; TX_BUFS],
}

pub static BUFFERS: Exclusive<Buffers> = Exclusive::new(Buffers {
    rx: [[0; BUF_LEN]; RX_BUFS],
    tx: [[0; BUF_LEN]; TX_BUFS],
});

/// Frames and errors the device side counted.
#[derive(Clone, Copy, Default)]
pub struct DeviceCounters {
    pub rx: u64,
    pub tx: u64,
    pub err: u64,
}

pub struct NetDevice {
    driver: Driver,
    rx_bufs: &'static mut [[u8; BUF_LEN]; RX_BUFS],
    tx_bufs: &'static mut [[u8; BUF_LEN]; TX_BUFS],
    /// Receive buffer behind each descriptor token (NO_SLOT: none).
    rx_slot: [u8; QUEUE_SIZE],
    /// Transmit buffer and frame length (header included) behind each token.
    tx_slot: [(u8, u16); QUEUE_SIZE],
    /// Transmit buffers not queued (bit i: buffer i is free).
    tx_free: u64,
    /// Receive buffers used and waiting to go back to the device.
    repost: [u8; RX_BUFS],
    repost_len: usize,
    pub counters: DeviceCounters,
}

/// Why the receive ring could not be filled at start.
pub struct PostError(pub virtio_drivers::Error);

impl NetDevice {
    /// Takes the buffers and posts every receive buffer.
    pub fn new(mut driver: Driver, bufs: &'static mut Buffers) -> Result<Self, PostError> {
        // The guest polls; an interrupt it never takes (IF=0) still costs
        // it dearly under KVM here (see README, "Network").
        driver.disable_interrupts();
        let mut dev = Self {
            driver,
            rx_bufs: &mut bufs.rx,
            tx_bufs: &mut bufs.tx,
            rx_slot: [NO_SLOT; QUEUE_SIZE],
            tx_slot: [(NO_SLOT, 0); QUEUE_SIZE],
            tx_free: (1u64 << TX_BUFS) - 1,
            repost: [0; RX_BUFS],
            repost_len: 0,
            counters: DeviceCounters::default(),
        };
        for i in 0..RX_BUFS {
            dev.post(i).map_err(PostError)?;
        }
        Ok(dev)
    }

    /// Acknowledges interrupts the device raised before they were
    /// suppressed (two register accesses, once).
    pub fn quiet_interrupts(&mut self) {
        self.driver.ack_interrupt();
    }

    pub fn mac(&self) -> [u8; 6] {
        self.driver.mac_address()
    }

    /// Whether a received frame waits in the used ring (a memory read, no exit).
    pub fn rx_ready(&self) -> bool {
        self.driver.poll_receive().is_some()
    }

    /// Gives used receive buffers back once a batch has gathered, or all
    /// of them with `all`.
    pub fn repost(&mut self, all: bool) {
        if self.repost_len < RX_REPOST_BATCH && !(all && self.repost_len > 0) {
            return;
        }
        while self.repost_len > 0 {
            self.repost_len -= 1;
            let i = usize::from(self.repost[self.repost_len]);
            if self.post(i).is_err() {
                self.counters.err += 1;
            }
        }
    }

    /// Queues receive buffer `i` on the device.
    fn post(&mut self, i: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: buffer i is ours (not queued): it is not touched again
        // until the device hands its token back through the used ring.
        let token = unsafe { self.driver.receive_begin(&mut self.rx_bufs[i]) }?;
        match self.rx_slot.get_mut(usize::from(token)) {
            Some(slot) => *slot = i as u8,
            None => return Err(virtio_drivers::Error::WrongToken),
        }
        Ok(())
    }

    /// Takes transmit buffers the device has finished with back.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.driver.poll_transmit() {
            let Some(&(i, len)) = self.tx_slot.get(usize::from(token)) else {
                self.counters.err += 1;
                return;
            };
            if i == NO_SLOT {
                self.counters.err += 1;
                return;
            }
            let buf = &self.tx_bufs[usize::from(i)][..usize::from(len)];
            // SAFETY: the same buffer (and length) that transmit_begin got
            // with this token.
            match unsafe { self.driver.transmit_complete(token, buf) } {
                Ok(_) => {
                    self.tx_slot[usize::from(token)] = (NO_SLOT, 0);
                    self.tx_free |= 1 << i;
                }
                Err(_) => {
                    self.counters.err += 1;
                    return;
                }
            }
        }
    }

    /// The next received frame: its buffer and where the frame lies in it.
    fn next_rx(&mut self) -> Option<(usize, usize, usize)> {
        while let Some(token) = self.driver.poll_receive() {
            let slot = self.rx_slot.get(usize::from(token)).copied();
            let Some(i) = slot.filter(|&i| i != NO_SLOT).map(usize::from) else {
                // A token we never posted: the ring is beyond repair, so
                // stop reading it rather than guess.
                self.counters.err += 1;
                return None;
            };
            self.rx_slot[usize::from(token)] = NO_SLOT;
            // SAFETY: buffer i is the one posted with this token.
            let done = unsafe { self.driver.receive_complete(token, &mut self.rx_bufs[i]) };
            self.repost[self.repost_len] = i as u8;
            self.repost_len += 1;
            match done {
                Ok((hdr, len)) if hdr + len <= BUF_LEN && len > 0 => {
                    self.counters.rx += 1;
                    return Some((i, hdr, len));
                }
                _ => self.counters.err += 1,
            }
        }
        None
    }

    fn free_tx(&self) -> Option<usize> {
        (self.tx_free != 0).then(|| self.tx_free.trailing_zeros() as usize)
    }
}

pub struct RxToken<'a> {
    frame: &'a [u8],
}

pub struct TxToken<'a> {
    driver: &'a mut Driver,
    tx_bufs: &'a mut [[u8; BUF_LEN]; TX_BUFS],
    tx_slot: &'a mut [(u8, u16); QUEUE_SIZE],
    tx_free: &'a mut u64,
    counters: &'a mut DeviceCounters,
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.reclaim_tx();
        // A receive needs a transmit buffer for its answer; without one
        // the frame stays in the ring until the device gives one back.
        self.free_tx()?;
        let (i, hdr, len) = self.next_rx()?;
        Some((
            RxToken {
                frame: &self.rx_bufs[i][hdr..hdr + len],
            },
            TxToken {
                driver: &mut self.driver,
                tx_bufs: &mut *self.tx_bufs,
                tx_slot: &mut self.tx_slot,
                tx_free: &mut self.tx_free,
                counters: &mut self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.reclaim_tx();
        self.free_tx()?;
        Some(TxToken {
            driver: &mut self.driver,
            tx_bufs: &mut *self.tx_bufs,
            tx_slot: &mut self.tx_slot,
            tx_free: &mut self.tx_free,
            counters: &mut self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // Bursts are bounded by the free transmit buffers anyway.
        caps.max_burst_size = Some(TX_BUFS);
        caps
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // receive() and transmit() made sure a buffer is free.
        let i = self.tx_free.trailing_zeros() as usize % TX_BUFS;
        let buf = &mut self.tx_bufs[i];
        let hdr = self.driver.fill_buffer_header(buf).unwrap_or(0);
        // smoltcp keeps to the MTU given in capabilities(): this only
        // guards the slice bounds.
        let len = len.min(BUF_LEN - hdr);
        let result = f(&mut buf[hdr..hdr + len]);
        let frame = &buf[..hdr + len];
        // SAFETY: buffer i stays untouched until reclaim_tx gets its token
        // back from the used ring.
        match unsafe { self.driver.transmit_begin(frame) } {
            Ok(token) => match self.tx_slot.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = (i as u8, (hdr + len) as u16);
                    *self.tx_free &= !(1 << i);
                    self.counters.tx += 1;
                }
                None => self.counters.err += 1,
            },
            Err(_) => self.counters.err += 1,
        }
        result
    }
}
