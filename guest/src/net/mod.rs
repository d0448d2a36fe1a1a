//! The guest's network (README, "Network"): a virtio-net card over
//! virtio-mmio, found by scanning the slots, driven by polling from vCPU 0
//! (no interrupts), with smoltcp as the TCP/IP stack and the echo services
//! on top. Nothing here allocates: every buffer is in .bss.
//!
//! * `notify`: notifications sent once per poll
//! * `device`: smoltcp's view of the card
//! * `echo`: the TCP and UDP echo services
//!
//! Polling. vCPU 0 calls [`Net::poll`] at every look at its clock (every
//! slice of at most 16 pages of work, and between the bytes of the lines it
//! prints). When no frame waits in the receive used ring (a memory read)
//! and smoltcp has no timer due, that is all it costs: a frame is taken up
//! within microseconds of its arrival. The work a poll does is bracketed
//! by looks at the stall clock, and each notification (an MMIO write, one
//! exit) is followed by one, so network work costs the stall clock at most
//! one exit, like a console byte, while a blackout in the middle of it
//! still shows in full.

mod device;
mod echo;
mod notify;

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};

use crate::cmdline::NetConfig;
use crate::console::{Line, Watch};
use crate::sync::Exclusive;
use crate::time::{rdtsc, StallClock, Tsc};
use crate::virtio::discover;
use device::NetDevice;
use echo::Echo;
use notify::Notifier;

/// Longest wait between two polls when nothing arrives and smoltcp asks
/// for no earlier one.
const MAX_WAIT_MS: u64 = 50;
/// Shortest wait, so a smoltcp that asks to be polled "now" over and over
/// (e.g. while every transmit buffer is in flight) does not turn every
/// look at the clock into a full poll.
const MIN_WAIT_US: u64 = 20;
/// Longest step of the network clock between two polls.
const MAX_STEP_MS: u64 = 1000;
/// Rounds of receive / serve / transmit in one poll.
const ROUNDS: u32 = 4;

/// Everything the heartbeat reports about the network.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    pub tcp_conns: u64,
    pub tcp_replies: u64,
    pub udp_echoes: u64,
    pub err: u64,
}

/// What went wrong bringing the network up (an EXIT reason).
pub enum InitError {
    NotFound { transports: u32 },
    Transport(virtio_drivers::transport::mmio::MmioError),
    Driver(virtio_drivers::Error),
    BadMac([u8; 6]),
    Sockets,
    AlreadyUp,
}

impl InitError {
    /// Appends the reason to an EXIT line.
    pub fn describe(&self, l: &mut Line) {
        use core::fmt::Write;
        let _ = match self {
            InitError::NotFound { transports } => write!(
                l,
                "net= given but no virtio-net device in the {} virtio-mmio slots at {:#x} ({} transports answered)",
                discover::SLOTS,
                discover::SLOTS_BASE,
                transports
            ),
            InitError::Transport(e) => write!(l, "virtio-net: bad virtio-mmio transport: {e}"),
            InitError::Driver(e) => write!(l, "virtio-net: device initialisation failed: {e}"),
            InitError::BadMac(mac) => {
                l.text("virtio-net: the device's MAC ").mac(*mac);
                write!(l, " is not a unicast address")
            }
            InitError::Sockets => write!(l, "net: cannot set up the echo sockets"),
            InitError::AlreadyUp => write!(l, "net: brought up twice"),
        };
    }
}

pub struct Net {
    iface: Interface,
    dev: NetDevice,
    notifier: Notifier,
    sockets: SocketSet<'static>,
    echo: Echo,
    tsc: Tsc,
    /// TSC of the last full poll, and the network clock (TSC ticks summed
    /// over polls: it never goes backwards and never leaps, whatever the
    /// TSC does after a migration).
    last_tsc: u64,
    net_ticks: u64,
    /// Ticks after `last_tsc` before the next full poll is due.
    wait_ticks: u64,
}

static NET: Exclusive<Option<Net>> = Exclusive::new(None);

impl Net {
    /// Finds the card, brings it up, configures the address from `cfg`,
    /// starts the services and prints the NET line.
    pub fn init(cfg: &NetConfig, tsc: Tsc) -> Result<&'static mut Net, InitError> {
        let slot = NET.take().ok_or(InitError::AlreadyUp)?;
        let found = discover::find(discover::DEVICE_ID_NET).map_err(|e| InitError::NotFound {
            transports: e.transports,
        })?;
        let header = core::ptr::NonNull::new(found.addr as *mut VirtIOHeader)
            .unwrap_or_else(|| unreachable!());
        // SAFETY: a virtio-mmio register block and config space of
        // SLOT_SIZE bytes sit at found.addr (the scan read its magic
        // value), identity-mapped for the whole run; nothing else in the
        // guest touches them.
        let transport = unsafe { MmioTransport::new(header, discover::SLOT_SIZE) }
            .map_err(InitError::Transport)?;
        let version = transport.version();
        let (transport, notifier) = notify::DeferredNotify::new(transport, found.addr);
        let driver = VirtIONetRaw::new(transport).map_err(InitError::Driver)?;
        let bufs = device::BUFFERS.take().ok_or(InitError::AlreadyUp)?;
        let mut dev = NetDevice::new(driver, bufs).map_err(|e| InitError::Driver(e.0))?;
        notifier.flush(|| {});
        // Frames may have arrived (and raised the interrupt line) before
        // interrupts were suppressed: lower it once.
        dev.quiet_interrupts();
        let mac = dev.mac();
        let hw = EthernetAddress(mac);
        if !hw.is_unicast() {
            return Err(InitError::BadMac(mac));
        }
        let mut config = Config::new(HardwareAddress::Ethernet(hw));
        config.random_seed = rdtsc();
        let mut iface = Interface::new(config, &mut dev, Instant::ZERO);
        let [a, b, c, d] = cfg.ip;
        iface.update_ip_addrs(|addrs| {
            // A fresh interface has room for one address.
            let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), cfg.prefix));
        });
        let storage = echo::STORAGE.take().ok_or(InitError::AlreadyUp)?;
        let (echo, sockets) = Echo::new(cfg.port, storage).map_err(|_| InitError::Sockets)?;

        Line::new("NET")
            .field("slot", u64::from(found.slot))
            .hex_field("addr", found.addr)
            .field(
                "version",
                match version {
                    MmioVersion::Legacy => 1,
                    MmioVersion::Modern => 2,
                },
            )
            .text(" mac=")
            .mac(mac)
            .text(" ip=")
            .ipv4(cfg.ip)
            .text("/")
            .dec(u64::from(cfg.prefix))
            .field("port", u64::from(cfg.port))
            .field("scan_reads", u64::from(found.reads))
            .field("scan_us", tsc.to_us(found.ticks))
            .send();

        let now = rdtsc();
        Ok(slot.insert(Net {
            iface,
            dev,
            notifier,
            sockets,
            echo,
            tsc,
            last_tsc: now,
            net_ticks: 0,
            wait_ticks: 0,
        }))
    }

    /// Serves the network if a frame waits or a timer is due (see the
    /// module documentation); `now` is the TSC the caller just read.
    pub fn poll(&mut self, now: u64, clock: &mut StallClock) {
        // A TSC that went backwards wraps to a huge value: poll.
        if now.wrapping_sub(self.last_tsc) < self.wait_ticks && !self.dev.rx_ready() {
            return;
        }
        self.poll_now(now, clock);
    }

    fn poll_now(&mut self, now: u64, clock: &mut StallClock) {
        // A step above MAX_STEP_MS is a blackout or another host's TSC
        // (the guest TSC is the host's): let smoltcp see at most that, so
        // a TSC hours ahead cannot time out every connection at once.
        let step = now.saturating_sub(self.last_tsc);
        self.net_ticks += step.min(self.tsc.ticks_from_ms(MAX_STEP_MS));
        self.last_tsc = now;
        let timestamp = Instant::from_micros(self.tsc.to_us(self.net_ticks) as i64);
        for _ in 0..ROUNDS {
            // One frame at a time, with a look at the clock after each:
            // a full ring is a long piece of work, and each frame of it is
            // short.
            for _ in 0..device::QUEUE_SIZE {
                let done =
                    self.iface
                        .poll_ingress_single(timestamp, &mut self.dev, &mut self.sockets);
                clock.look();
                if done == PollIngressSingleResult::None {
                    break;
                }
                // A burst must not empty the ring before it is refilled
                // (the device sees the buffers at once if it polls, or at
                // the notification below).
                self.dev.repost(false);
            }
            // Timers, neighbour cache, and what the frames made due.
            self.iface.poll(timestamp, &mut self.dev, &mut self.sockets);
            clock.look();
            let sent = self.echo.serve(&mut self.sockets);
            if sent {
                self.iface
                    .poll_egress(timestamp, &mut self.dev, &mut self.sockets);
            }
            // Replies first: the transmit notification goes out before
            // receive buffers are handed back.
            self.flush(clock);
            self.dev.repost(false);
            self.flush(clock);
            if !self.dev.rx_ready() {
                break;
            }
        }
        // poll_delay is 0 for a deadline already past.
        let wait_us = match self.iface.poll_delay(timestamp, &self.sockets) {
            Some(delay) => delay.total_micros(),
            None => MAX_WAIT_MS * 1000,
        };
        let wait_us = wait_us.clamp(MIN_WAIT_US, MAX_WAIT_MS * 1000);
        self.wait_ticks = self.tsc.ticks_from_us(wait_us);
    }

    /// Sends pending notifications, looking at the clock after each one.
    fn flush(&mut self, clock: &mut StallClock) {
        self.notifier.flush(|| {
            clock.look();
        });
    }

    pub fn counters(&self) -> Counters {
        let d = self.dev.counters;
        let e = self.echo.counters;
        Counters {
            rx: d.rx,
            tx: d.tx,
            tcp_conns: e.tcp_conns,
            tcp_replies: e.tcp_replies,
            udp_echoes: e.udp_echoes,
            err: d.err + e.err,
        }
    }
}

/// vCPU 0's duty between two console bytes: look at the clock, serve the
/// network.
pub struct Serving<'a> {
    pub clock: &'a mut StallClock,
    pub net: &'a mut Net,
}

impl Watch for Serving<'_> {
    fn watch(&mut self) {
        let now = self.clock.look();
        self.net.poll(now, self.clock);
    }
}
