//! The client probe of issue 15: from the client's namespace, one TCP
//! connection that sends a numbered request every interval and matches the
//! server's numbered replies, and a UDP datagram every interval that the
//! server echoes. `stop` says what was lost, duplicated, reordered, how
//! long the longest silence was and whether the connection survived.

mod report;
mod schedule;
mod tally;
mod tcp;
mod tcp_info;
mod udp;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use report::{GapReport, ProbeReport, TcpReport, UdpReport};
use schedule::Schedule;
use tally::Tally;
use tcp::{TcpConn, TcpSide, TcpState};
use udp::{read_echoes, UdpSide, UdpState};

use crate::{NetlabError, Topology};

/// The longest the sender sleeps before looking at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// One TCP request and one UDP probe per interval.
    pub interval: Duration,
    pub tcp: bool,
    pub udp: bool,
    pub connect_timeout: Duration,
    /// After `stop`, how long to wait for replies still on their way.
    pub drain: Duration,
    /// The probe stops sending by itself after this long.
    pub max_duration: Duration,
    /// Whether a broken connection is replaced by a new one (counted in
    /// `reconnects`; the connection is then not "kept").
    pub reconnect: bool,
    /// Connection attempts at most, one per `reconnect_interval`.
    pub max_reconnects: u32,
    pub reconnect_interval: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: Duration::from_millis(1),
            tcp: true,
            udp: true,
            connect_timeout: Duration::from_secs(3),
            drain: Duration::from_secs(1),
            max_duration: Duration::from_secs(600),
            reconnect: false,
            max_reconnects: 20,
            reconnect_interval: Duration::from_millis(100),
        }
    }
}

/// A running probe.
pub struct Probe {
    ns: String,
    target: SocketAddr,
    config: ProbeConfig,
    start: Instant,
    stop_sending: Arc<AtomicBool>,
    stop_readers: Arc<AtomicBool>,
    sender: Option<JoinHandle<SenderEnd>>,
    tcp: Option<Arc<TcpSide>>,
    udp_state: Option<Arc<Mutex<UdpState>>>,
    udp_reader: Option<JoinHandle<()>>,
}

/// What the sender hands back when it stops.
struct SenderEnd {
    conn: Option<TcpConn>,
    last_send: Option<Instant>,
    skipped: u64,
}

impl Probe {
    /// Probes the topology's guest address on `port` from its client.
    pub fn start_on(
        topology: &Topology,
        port: u16,
        config: ProbeConfig,
    ) -> Result<Probe, NetlabError> {
        Self::start(
            topology.client_ns(),
            SocketAddrV4::new(topology.guest_ip(), port),
            config,
        )
    }

    /// Probes `target` from namespace `ns`. Fails, with nothing left
    /// running, if the TCP connection cannot be made.
    pub fn start(
        ns: &str,
        target: SocketAddrV4,
        config: ProbeConfig,
    ) -> Result<Probe, NetlabError> {
        if config.interval.is_zero() {
            return Err(NetlabError::BadProbeConfig(
                "the interval must be more than zero",
            ));
        }
        if !config.tcp && !config.udp {
            return Err(NetlabError::BadProbeConfig("enable TCP, UDP or both"));
        }
        if target.ip() == &Ipv4Addr::UNSPECIFIED || target.port() == 0 {
            return Err(NetlabError::BadProbeConfig(
                "the target needs an address and a port",
            ));
        }
        let target = SocketAddr::V4(target);
        // Readers end on their own a little after the sender would.
        let deadline = Instant::now()
            + config.connect_timeout
            + config.max_duration
            + config.drain
            + Duration::from_secs(5);
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_readers = Arc::new(AtomicBool::new(false));

        let (tcp, conn) = if config.tcp {
            let side = Arc::new(TcpSide {
                ns: ns.to_string(),
                target,
                connect_timeout: config.connect_timeout,
                state: Arc::new(Mutex::new(TcpState::new())),
                stop_readers: Arc::clone(&stop_readers),
                deadline,
            });
            let conn = side.connect()?;
            (Some(side), Some(conn))
        } else {
            (None, None)
        };

        // From here on a failure stops what was started before it.
        let fail = |e: NetlabError, conn: Option<TcpConn>| {
            stop_readers.store(true, Ordering::Relaxed);
            if let (Some(tcp), Some(conn)) = (&tcp, conn) {
                tcp.retire(conn);
            }
            e
        };
        let (udp, udp_state, udp_reader) = if config.udp {
            match start_udp(ns, target, &stop_readers, deadline) {
                Ok((side, reader)) => {
                    let state = Arc::clone(&side.state);
                    (Some(side), Some(state), Some(reader))
                }
                Err(e) => return Err(fail(e, conn)),
            }
        } else {
            (None, None, None)
        };

        // The schedule starts once the connection is made, so the time to
        // connect is neither a gap nor skipped slots.
        let start = Instant::now();
        let (tcp_for_sender, stop, cfg) = (tcp.clone(), Arc::clone(&stop_sending), config.clone());
        // The sender gets the connection through a slot, so that a failed
        // spawn hands it back for cleaning up.
        let handoff = Arc::new(Mutex::new(conn));
        let conn_slot = Arc::clone(&handoff);
        let spawned = std::thread::Builder::new()
            .name("probe sender".into())
            .spawn(move || {
                let conn = conn_slot.lock().unwrap().take();
                send_loop(start, cfg, stop, tcp_for_sender, conn, udp)
            });
        let sender = match spawned {
            Ok(h) => h,
            Err(source) => {
                let conn = handoff.lock().unwrap().take();
                if let Some(r) = udp_reader {
                    stop_readers.store(true, Ordering::Relaxed);
                    let _ = r.join();
                }
                let e = NetlabError::Thread {
                    ns: ns.to_string(),
                    source,
                };
                return Err(fail(e, conn));
            }
        };

        Ok(Probe {
            ns: ns.to_string(),
            target,
            config,
            start,
            stop_sending,
            stop_readers,
            sender: Some(sender),
            tcp,
            udp_state,
            udp_reader,
        })
    }

    /// Requests sent so far (TCP, or UDP when TCP is off).
    pub fn sent(&self) -> u64 {
        if let Some(tcp) = &self.tcp {
            return tcp.state.lock().unwrap().send_times.len() as u64;
        }
        self.udp_state
            .as_ref()
            .map_or(0, |u| u.lock().unwrap().send_times.len() as u64)
    }

    /// Replies (TCP) and echoes (UDP) received so far.
    pub fn received(&self) -> (u64, u64) {
        let tcp = self
            .tcp
            .as_ref()
            .map_or(0, |t| t.state.lock().unwrap().tally.received);
        let udp = self
            .udp_state
            .as_ref()
            .map_or(0, |u| u.lock().unwrap().tally.received);
        (tcp, udp)
    }

    /// Stops sending, waits up to the drain time for replies still on
    /// their way, and reports.
    pub fn stop(mut self) -> ProbeReport {
        self.finish()
    }

    fn all_answered(&self) -> bool {
        let tcp_done = self.tcp.as_ref().is_none_or(|t| {
            let st = t.state.lock().unwrap();
            st.tally.received >= st.send_times.len() as u64
        });
        let udp_done = self.udp_state.as_ref().is_none_or(|u| {
            let st = u.lock().unwrap();
            st.tally.received >= st.send_times.len() as u64
        });
        tcp_done && udp_done
    }

    fn finish(&mut self) -> ProbeReport {
        self.stop_sending.store(true, Ordering::Relaxed);
        let end = self
            .sender
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or(SenderEnd {
                conn: None,
                last_send: None,
                skipped: 0,
            });
        let drain_until = Instant::now() + self.config.drain;
        while !self.all_answered() && Instant::now() < drain_until {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stop_readers.store(true, Ordering::Relaxed);
        // The connection is whole if no reader or write saw it break.
        let conn_kept_alive = match (&self.tcp, &end.conn) {
            (Some(tcp), Some(conn)) => !tcp.is_broken(conn),
            _ => false,
        };
        if let (Some(tcp), Some(conn)) = (&self.tcp, end.conn) {
            tcp.retire(conn);
        }
        if let Some(r) = self.udp_reader.take() {
            let _ = r.join();
        }
        let first = self.start;
        let duration_ms = end
            .last_send
            .map_or(0.0, |t| ms(t.saturating_duration_since(first)));

        let tcp = self.tcp.as_ref().map(|t| {
            let mut st = t.state.lock().unwrap();
            let sent = st.send_times.len() as u64;
            let first_send = st.send_times.first().copied().unwrap_or(first);
            st.tally.close(sent, first_send, end.last_send);
            // retire() added up every connection's count.
            let retransmissions = st.retrans_before;
            TcpReport {
                requests_sent: sent,
                requests_unsent: st.unsent,
                replies_received: st.tally.received,
                replies_missing: sent.saturating_sub(st.tally.received),
                replies_duplicated: st.tally.duplicated,
                replies_out_of_order: st.tally.out_of_order,
                replies_malformed: st.malformed,
                reply_counter_breaks: st.counter_breaks,
                connection_kept: conn_kept_alive && st.reconnects == 0,
                resets: st.resets,
                closed_by_peer: st.closed_by_peer,
                other_errors: st.other_errors,
                reconnects: st.reconnects,
                longest_gap: gap_report(&st.tally, first),
                longest_rtt_us: st.tally.longest_rtt.map(|d| d.as_micros() as u64),
                retransmissions,
                last_error: st.last_error.clone(),
            }
        });
        let udp = self.udp_state.as_ref().map(|u| {
            let mut st = u.lock().unwrap();
            let sent = st.send_times.len() as u64;
            let first_send = st.send_times.first().copied().unwrap_or(first);
            st.tally.close(sent, first_send, end.last_send);
            UdpReport {
                probes_sent: sent,
                echoed: st.tally.received,
                lost: sent.saturating_sub(st.tally.received),
                duplicated: st.tally.duplicated,
                out_of_order: st.tally.out_of_order,
                malformed: st.malformed,
                errors: st.errors,
                longest_gap: gap_report(&st.tally, first),
                longest_rtt_us: st.tally.longest_rtt.map(|d| d.as_micros() as u64),
            }
        });
        ProbeReport {
            namespace: self.ns.clone(),
            target: self.target.to_string(),
            interval_us: self.config.interval.as_micros() as u64,
            duration_ms,
            slots_skipped: end.skipped,
            tcp,
            udp,
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.config.drain = Duration::ZERO;
            let _ = self.finish();
        }
    }
}

/// Opens the UDP side and starts its reader.
fn start_udp(
    ns: &str,
    target: SocketAddr,
    stop_readers: &Arc<AtomicBool>,
    deadline: Instant,
) -> Result<(UdpSide, JoinHandle<()>), NetlabError> {
    let side = UdpSide::open(ns, target)?;
    let reading = side.socket.try_clone().map_err(|source| NetlabError::Io {
        ns: ns.to_string(),
        what: "cloning the UDP probe's socket".into(),
        source,
    })?;
    let state = Arc::clone(&side.state);
    let stop = Arc::clone(stop_readers);
    let reader = std::thread::Builder::new()
        .name("probe udp reader".into())
        .spawn(move || read_echoes(reading, state, stop, deadline))
        .map_err(|source| NetlabError::Thread {
            ns: ns.to_string(),
            source,
        })?;
    Ok((side, reader))
}

/// Milliseconds, rounded to the microsecond (the report's precision).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn gap_report(t: &Tally, first: Instant) -> Option<GapReport> {
    t.longest_gap.map(|(gap, from)| {
        let from_ms = ms(from.saturating_duration_since(first));
        GapReport {
            longest_us: gap.as_micros() as u64,
            from_ms,
            to_ms: from_ms + ms(gap),
        }
    })
}

/// Sleeps until `when`, waking every STOP_POLL to look at `stop`; false
/// when stopped.
fn sleep_until(when: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= when {
            return true;
        }
        std::thread::sleep((when - now).min(STOP_POLL));
    }
}

fn send_loop(
    start: Instant,
    config: ProbeConfig,
    stop: Arc<AtomicBool>,
    tcp: Option<Arc<TcpSide>>,
    mut conn: Option<TcpConn>,
    udp: Option<UdpSide>,
) -> SenderEnd {
    let mut schedule = Schedule::new(start, config.interval);
    let stop_at = start + config.max_duration;
    let mut last_send = None;
    let mut reconnect_attempts = 0;
    let mut last_attempt: Option<Instant> = None;
    loop {
        let slot = schedule.next_slot(Instant::now());
        if slot >= stop_at || !sleep_until(slot, &stop) {
            break;
        }
        if let Some(side) = &tcp {
            if conn.as_ref().is_some_and(|c| side.is_broken(c)) && config.reconnect {
                side.retire(conn.take().expect("checked above"));
            }
            match conn.as_mut() {
                Some(c) if !side.is_broken(c) => side.send(c),
                Some(_) => side.state.lock().unwrap().unsent += 1,
                // Each attempt is bounded by the connect timeout, and the
                // number of attempts by max_reconnects.
                None if config.reconnect
                    && reconnect_attempts < config.max_reconnects
                    && last_attempt.is_none_or(|t| t.elapsed() >= config.reconnect_interval) =>
                {
                    reconnect_attempts += 1;
                    last_attempt = Some(Instant::now());
                    match side.connect() {
                        Ok(c) => {
                            side.state.lock().unwrap().reconnects += 1;
                            conn = Some(c);
                        }
                        Err(e) => {
                            let mut st = side.state.lock().unwrap();
                            st.last_error = Some(format!("reconnecting: {e}"));
                            st.unsent += 1;
                        }
                    }
                }
                None => side.state.lock().unwrap().unsent += 1,
            }
        }
        if let Some(u) = &udp {
            u.send();
        }
        last_send = Some(Instant::now());
    }
    SenderEnd {
        conn,
        last_send,
        skipped: schedule.skipped,
    }
}
