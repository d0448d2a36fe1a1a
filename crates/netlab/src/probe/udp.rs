//! The probe's UDP side: a socket made in the client's namespace and
//! connected to the target, datagrams `U<seq>` from the sender, and a
//! reader thread that counts the echoes.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tally::{Arrival, Tally};
use crate::netns::in_netns;
use crate::NetlabError;

const READ_POLL: Duration = Duration::from_millis(20);

pub(crate) struct UdpState {
    pub(crate) send_times: Vec<Instant>,
    pub(crate) tally: Tally,
    pub(crate) malformed: u64,
    pub(crate) errors: u64,
}

pub(crate) struct UdpSide {
    pub(crate) socket: UdpSocket,
    pub(crate) state: Arc<Mutex<UdpState>>,
}

impl UdpSide {
    pub(crate) fn open(ns: &str, target: SocketAddr) -> Result<UdpSide, NetlabError> {
        let socket = in_netns(ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            s.set_read_timeout(Some(READ_POLL))?;
            Ok::<_, std::io::Error>(s)
        })?
        .map_err(|source| NetlabError::Io {
            ns: ns.to_string(),
            what: format!("opening a UDP socket to {target}"),
            source,
        })?;
        Ok(UdpSide {
            socket,
            state: Arc::new(Mutex::new(UdpState {
                send_times: Vec::new(),
                tally: Tally::default(),
                malformed: 0,
                errors: 0,
            })),
        })
    }

    pub(crate) fn send(&self) {
        let seq = {
            let mut st = self.state.lock().unwrap();
            st.send_times.push(Instant::now());
            st.send_times.len() as u64
        };
        if self.socket.send(format!("U{seq}").as_bytes()).is_err() {
            self.state.lock().unwrap().errors += 1;
        }
    }
}

pub(crate) fn read_echoes(
    socket: UdpSocket,
    state: Arc<Mutex<UdpState>>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) {
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                let mut st = state.lock().unwrap();
                let seq = std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|s| s.strip_prefix('U'))
                    .and_then(|s| s.parse::<u64>().ok());
                let Some(seq) = seq else {
                    st.malformed += 1;
                    continue;
                };
                let sent_at = seq
                    .checked_sub(1)
                    .and_then(|i| st.send_times.get(i as usize).copied());
                let baseline = st.send_times.first().copied().unwrap_or(now);
                if st.tally.record(seq, now, sent_at, baseline) == Arrival::Unknown {
                    st.malformed += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // ICMP errors (port unreachable while nobody listens) are
            // reported on the next receive; count them and go on.
            Err(_) => state.lock().unwrap().errors += 1,
        }
    }
}
