//! What a probe saw, as one document (serde) and one paragraph (Display).

use std::fmt;

use serde::Serialize;

/// The longest silence between two consecutive replies.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GapReport {
    pub longest_us: u64,
    /// When the silence began and ended, in ms from the probe's start.
    pub from_ms: f64,
    pub to_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TcpReport {
    pub requests_sent: u64,
    /// Send slots after the connection broke (and was not replaced) in
    /// which no request could be sent.
    pub requests_unsent: u64,
    /// Distinct requests answered.
    pub replies_received: u64,
    pub replies_missing: u64,
    pub replies_duplicated: u64,
    /// Replies that came after the reply to a later request.
    pub replies_out_of_order: u64,
    /// Lines that were not `R <seq>` for a sequence number sent.
    pub replies_malformed: u64,
    /// Times the server's reply counter R did not go up by one.
    pub reply_counter_breaks: u64,
    /// One connection from start to stop: no reset, no close by the peer,
    /// no reconnect.
    pub connection_kept: bool,
    pub resets: u64,
    pub closed_by_peer: u64,
    pub other_errors: u64,
    pub reconnects: u64,
    pub longest_gap: Option<GapReport>,
    pub longest_rtt_us: Option<u64>,
    /// TCP_INFO tcpi_total_retrans of the client's socket(s).
    pub retransmissions: u32,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UdpReport {
    pub probes_sent: u64,
    /// Distinct probes echoed.
    pub echoed: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    /// Sends or receives the kernel refused (e.g. ICMP port unreachable).
    pub errors: u64,
    pub longest_gap: Option<GapReport>,
    pub longest_rtt_us: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub namespace: String,
    pub target: String,
    pub interval_us: u64,
    /// From the first send to the last.
    pub duration_ms: f64,
    /// Send slots skipped because the sender woke more than an interval
    /// late (the schedule never bursts to catch up).
    pub slots_skipped: u64,
    pub tcp: Option<TcpReport>,
    pub udp: Option<UdpReport>,
}

fn gap(g: &Option<GapReport>) -> String {
    match g {
        Some(g) => format!(
            "longest gap {:.1} ms (at {:.0} ms)",
            g.longest_us as f64 / 1000.0,
            g.from_ms
        ),
        None => "no replies".to_string(),
    }
}

impl ProbeReport {
    /// What the client lost across a migration, each named for a person:
    /// the connection not kept, resets, TCP requests without a reply, UDP
    /// probes without an echo, or fewer than `min_requests` requests sent
    /// (too little traffic to judge). Empty: nothing was lost.
    pub fn losses(&self, min_requests: u64) -> Vec<String> {
        let mut wrong = Vec::new();
        match &self.tcp {
            None => wrong.push("no TCP report".to_string()),
            Some(t) => {
                if !t.connection_kept {
                    wrong.push("the TCP connection was not kept".into());
                }
                if t.resets > 0 {
                    wrong.push(format!("{} TCP resets", t.resets));
                }
                if t.replies_missing > 0 {
                    wrong.push(format!("{} TCP requests lost", t.replies_missing));
                }
                if t.requests_sent < min_requests {
                    wrong.push(format!(
                        "only {} TCP requests sent, want at least {min_requests}",
                        t.requests_sent
                    ));
                }
            }
        }
        match &self.udp {
            None => wrong.push("no UDP report".to_string()),
            Some(u) if u.lost > 0 => wrong.push(format!("{} UDP probes lost", u.lost)),
            Some(_) => {}
        }
        wrong
    }
}

fn rtt(r: Option<u64>) -> String {
    r.map_or(String::new(), |us| {
        format!(", longest round trip {:.1} ms", us as f64 / 1000.0)
    })
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "probe {} from {}: every {} us for {:.0} ms ({} slots skipped)",
            self.target, self.namespace, self.interval_us, self.duration_ms, self.slots_skipped
        )?;
        if let Some(t) = &self.tcp {
            writeln!(
                f,
                "  TCP: {} requests ({} unsent), {} replies, {} missing, {} duplicated, {} out of order; connection {}; {} resets, {} closed by the server, {} reconnects; {}{}; {} retransmissions",
                t.requests_sent,
                t.requests_unsent,
                t.replies_received,
                t.replies_missing,
                t.replies_duplicated,
                t.replies_out_of_order,
                if t.connection_kept { "kept" } else { "NOT kept" },
                t.resets,
                t.closed_by_peer,
                t.reconnects,
                gap(&t.longest_gap),
                rtt(t.longest_rtt_us),
                t.retransmissions
            )?;
        }
        if let Some(u) = &self.udp {
            writeln!(
                f,
                "  UDP: {} probes, {} echoed, {} lost, {} duplicated, {} out of order; {}{}",
                u.probes_sent,
                u.echoed,
                u.lost,
                u.duplicated,
                u.out_of_order,
                gap(&u.longest_gap),
                rtt(u.longest_rtt_us)
            )?;
        }
        Ok(())
    }
}
