//! Watches a running guest through its console: parses every line with the
//! test guest's one parser and keeps what a verdict needs (first heartbeat,
//! READY, counters, errors, the longest stall, why it stopped).

use std::time::{Duration, Instant};

use ferry_testguest::console::{self, Heartbeat, Line};
use ferry_vmm::{StopReason, VmEvent};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct GuestWatch {
    #[serde(skip)]
    start: Option<Instant>,
    /// From the start of the command to the guest's first heartbeat.
    pub first_heartbeat_ms: Option<f64>,
    /// From the start of the command to the READY line.
    pub ready_ms: Option<f64>,
    pub heartbeats: u64,
    /// The first heartbeat seen, and the stall it reported: after a
    /// restore or migration, the blackout the guest itself measured.
    pub first_seq: Option<u64>,
    pub first_stall_us: u64,
    pub last_seq: Option<u64>,
    /// Heartbeats whose sequence number did not follow the previous one.
    pub sequence_breaks: u64,
    pub pages_written: u64,
    pub pages_verified: u64,
    pub errors: u64,
    pub sweeps: u64,
    pub max_stall_us: u64,
    /// The stall the latest heartbeat reported.
    pub last_stall_us: u64,
    /// Pages the guest named as bad (its first few), guest-physical.
    pub bad_pages: Vec<u64>,
    pub guest_exit: Option<String>,
    pub stopped: Option<String>,
}

/// What one event meant, for a caller that prints or decides.
pub enum Seen<'a> {
    Console(&'a str, Line),
    Stopped(&'a StopReason),
}

impl GuestWatch {
    pub fn new(start: Instant) -> Self {
        Self {
            start: Some(start),
            ..Default::default()
        }
    }

    fn since_start(&self, at: Instant) -> f64 {
        let start = self.start.unwrap_or(at);
        at.saturating_duration_since(start).as_secs_f64() * 1e3
    }

    pub fn observe<'a>(&mut self, event: &'a VmEvent) -> Seen<'a> {
        match event {
            VmEvent::Console(line) => {
                let parsed = console::parse_line(&line.text);
                match &parsed {
                    Line::Heartbeat(hb) => self.heartbeat(hb, line.at),
                    Line::Ready(_) if self.ready_ms.is_none() => {
                        self.ready_ms = Some(self.since_start(line.at));
                    }
                    Line::PageError(e) => self.bad_pages.push(e.addr),
                    Line::Exit(e) => {
                        self.guest_exit = Some(format!("code {}: {}", e.code, e.reason))
                    }
                    _ => {}
                }
                Seen::Console(&line.text, parsed)
            }
            VmEvent::Stopped(reason) => {
                self.stopped = Some(reason.to_string());
                Seen::Stopped(reason)
            }
        }
    }

    fn heartbeat(&mut self, hb: &Heartbeat, at: Instant) {
        if self.first_heartbeat_ms.is_none() {
            self.first_heartbeat_ms = Some(self.since_start(at));
            self.first_seq = Some(hb.seq);
            self.first_stall_us = hb.stall_us;
        }
        if let Some(prev) = self.last_seq {
            if hb.seq != prev + 1 {
                self.sequence_breaks += 1;
            }
        }
        self.heartbeats += 1;
        self.last_seq = Some(hb.seq);
        self.pages_written = hb.wr;
        self.pages_verified = hb.ver;
        self.errors = hb.err;
        self.sweeps = hb.sweeps;
        self.max_stall_us = self.max_stall_us.max(hb.stall_us);
        self.last_stall_us = hb.stall_us;
    }

    /// True when the guest verified its memory and found nothing wrong.
    pub fn memory_ok(&self) -> bool {
        self.heartbeats > 0 && self.errors == 0 && self.bad_pages.is_empty()
    }

    /// The latest heartbeat's figures, for a Status answer.
    pub fn guest_facts(&self) -> Option<ferry_control::GuestFacts> {
        Some(ferry_control::GuestFacts {
            seq: self.last_seq?,
            err: self.errors,
            stall_us: self.last_stall_us,
            max_stall_us: self.max_stall_us,
            wr: self.pages_written,
            ver: self.pages_verified,
            sequence_breaks: self.sequence_breaks,
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.start.map(|s| s.elapsed()).unwrap_or_default()
    }
}
