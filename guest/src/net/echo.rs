//! The services on PORT (README, "Network"): a TCP echo that numbers its
//! replies (`R <line>\n` for each `\n`-terminated line, R counting from 1
//! on each connection) on up to [`TCP_CONNS`] connections at once, and a
//! UDP echo that sends each datagram back unchanged.

use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Duration;

use crate::sync::Exclusive;

/// TCP connections served at once (each has its own listening socket).
pub const TCP_CONNS: usize = 6;
/// Sockets: the TCP ones and one UDP socket.
pub const SOCKETS: usize = TCP_CONNS + 1;
/// Longest line, without its `\n`.
pub const LINE_MAX: usize = 64;
/// Longest reply: a 20-digit counter, a space, the line, `\n`.
const REPLY_MAX: usize = 20 + 1 + LINE_MAX + 1;
const TCP_BUF: usize = 2048;
/// Room for the datagrams of a whole migration blackout: a client probing
/// every millisecond sends ~100 during a 100 ms stall, and they all arrive
/// at once when the guest runs again (16 lost most of them).
const UDP_BUF: usize = 32 * 1024;
const UDP_PACKETS: usize = 256;
const UDP_MAX: usize = 1472;
/// A connection whose peer stops answering is dropped after this, so a
/// vanished client does not hold a socket for good.
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);
const TCP_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket storage and buffers, in .bss.
pub struct Storage {
    sockets: [SocketStorage<'static>; SOCKETS],
    tcp_rx: [[u8; TCP_BUF]; TCP_CONNS],
    tcp_tx: [[u8; TCP_BUF]; TCP_CONNS],
    udp_rx_meta: [udp::PacketMetadata; UDP_PACKETS],
    udp_rx: [u8; UDP_BUF],
    udp_tx_meta: [udp::PacketMetadata; UDP_PACKETS],
    udp_tx: [u8; UDP_BUF],
}

pub static STORAGE: Exclusive<Storage> = Exclusive::new(Storage {
    sockets: [SocketStorage::EMPTY; SOCKETS],
    tcp_rx: [[0; TCP_BUF]; TCP_CONNS],
    tcp_tx: [[0; TCP_BUF]; TCP_CONNS],
    udp_rx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
    udp_rx: [0; UDP_BUF],
    udp_tx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
    udp_tx: [0; UDP_BUF],
});

/// What the services counted.
#[derive(Clone, Copy, Default)]
pub struct EchoCounters {
    pub tcp_conns: u64,
    pub tcp_replies: u64,
    pub udp_echoes: u64,
    pub err: u64,
}

/// One TCP connection slot: its socket and the line being assembled.
struct Conn {
    handle: SocketHandle,
    /// A connection is up (counted in `tcp_conns`, numbering replies).
    up: bool,
    replies: u64,
    line: [u8; LINE_MAX],
    len: usize,
}

pub struct Echo {
    port: u16,
    conns: [Conn; TCP_CONNS],
    udp: SocketHandle,
    pub counters: EchoCounters,
}

/// Why the sockets could not be set up.
pub enum SetupError {
    Listen,
    Bind,
}

impl Echo {
    /// Creates the sockets in `storage` and starts listening on `port`.
    pub fn new(
        port: u16,
        storage: &'static mut Storage,
    ) -> Result<(Self, SocketSet<'static>), SetupError> {
        let mut sockets = SocketSet::new(&mut storage.sockets[..]);
        let mut handles = [None; TCP_CONNS];
        for ((handle, rx), tx) in handles
            .iter_mut()
            .zip(storage.tcp_rx.iter_mut())
            .zip(storage.tcp_tx.iter_mut())
        {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(&mut rx[..]),
                tcp::SocketBuffer::new(&mut tx[..]),
            );
            // Replies go out at once, not behind the previous one's ACK.
            socket.set_nagle_enabled(false);
            socket.set_keep_alive(Some(TCP_KEEPALIVE));
            socket.set_timeout(Some(TCP_TIMEOUT));
            socket.listen(port).map_err(|_| SetupError::Listen)?;
            *handle = Some(sockets.add(socket));
        }
        let mut udp = udp::Socket::new(
            udp::PacketBuffer::new(&mut storage.udp_rx_meta[..], &mut storage.udp_rx[..]),
            udp::PacketBuffer::new(&mut storage.udp_tx_meta[..], &mut storage.udp_tx[..]),
        );
        udp.bind(port).map_err(|_| SetupError::Bind)?;
        let udp = sockets.add(udp);
        let conns = handles.map(|h| Conn {
            handle: h.unwrap_or_else(|| unreachable!()),
            up: false,
            replies: 0,
            line: [0; LINE_MAX],
            len: 0,
        });
        Ok((
            Self {
                port,
                conns,
                udp,
                counters: EchoCounters::default(),
            },
            sockets,
        ))
    }

    /// Answers what has arrived; true if anything was queued to send.
    pub fn serve(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let mut sent = false;
        for conn in &mut self.conns {
            sent |= serve_tcp(conn, self.port, sockets, &mut self.counters);
        }
        sent | self.serve_udp(sockets)
    }

    fn serve_udp(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let socket = sockets.get_mut::<udp::Socket>(self.udp);
        let mut sent = false;
        let mut buf = [0u8; UDP_MAX];
        // Bounded: the receive buffer holds at most UDP_PACKETS datagrams.
        for _ in 0..UDP_PACKETS {
            if !socket.can_send() {
                break;
            }
            let Ok((n, meta)) = socket.recv_slice(&mut buf) else {
                break;
            };
            if socket.send_slice(&buf[..n], meta.endpoint).is_ok() {
                self.counters.udp_echoes += 1;
                sent = true;
            } else {
                self.counters.err += 1;
            }
        }
        sent
    }
}

/// Serves one TCP connection slot; true if a reply was queued.
fn serve_tcp(
    conn: &mut Conn,
    port: u16,
    sockets: &mut SocketSet<'static>,
    counters: &mut EchoCounters,
) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    match socket.state() {
        tcp::State::Closed => {
            // The connection ended (or never began): listen for the next.
            conn.up = false;
            if socket.listen(port).is_err() {
                counters.err += 1;
            }
            return false;
        }
        tcp::State::Listen | tcp::State::SynReceived => return false,
        _ => {}
    }
    if !conn.up {
        conn.up = true;
        conn.replies = 0;
        conn.len = 0;
        counters.tcp_conns += 1;
    }
    let mut sent = false;
    // Bounded: each pass consumes received bytes, of which the buffer
    // holds at most TCP_BUF.
    for _ in 0..TCP_BUF {
        if !socket.can_recv() || socket.send_capacity() - socket.send_queue() < REPLY_MAX {
            break;
        }
        let line = &mut conn.line;
        let len = &mut conn.len;
        let complete = socket.recv(|data| {
            let newline = data.iter().position(|&b| b == b'\n');
            let take = newline.map_or(data.len(), |n| n + 1);
            let body = newline.unwrap_or(data.len());
            let room = LINE_MAX - *len;
            let overflow = body > room;
            let copy = body.min(room);
            line[*len..*len + copy].copy_from_slice(&data[..copy]);
            *len += copy;
            (
                take,
                if overflow {
                    None
                } else {
                    Some(newline.is_some())
                },
            )
        });
        match complete {
            Ok(Some(true)) => {
                conn.replies += 1;
                let mut reply = [0u8; REPLY_MAX];
                let n = format_reply(&mut reply, conn.replies, &conn.line[..conn.len]);
                conn.len = 0;
                if socket.send_slice(&reply[..n]) == Ok(n) {
                    counters.tcp_replies += 1;
                    sent = true;
                } else {
                    counters.err += 1;
                }
            }
            Ok(Some(false)) => {}
            Ok(None) | Err(_) => {
                // A line longer than LINE_MAX breaks the protocol: reset
                // the connection (the client sees it) rather than guess.
                counters.err += 1;
                socket.abort();
                return sent;
            }
        }
    }
    // The client is done sending and has every reply queued: end our side.
    if socket.state() == tcp::State::CloseWait && !socket.can_recv() {
        socket.close();
    }
    sent
}

/// Writes `R <line>\n` into `out`; returns its length.
fn format_reply(out: &mut [u8; REPLY_MAX], r: u64, line: &[u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut v = r;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut len = 0;
    for i in (0..n).rev() {
        out[len] = digits[i];
        len += 1;
    }
    out[len] = b' ';
    len += 1;
    out[len..len + line.len()].copy_from_slice(line);
    len += line.len();
    out[len] = b'\n';
    len + 1
}
