//! The caps and pacing checked against the simulated migrator's own record
//! of when each migration ran: peaks of concurrency per host (outbound and
//! inbound), per tenant, per rack and fleet-wide, and the most starts in
//! any pacing window, each beside its cap.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::MigrationRecord;
use crate::policy::Policies;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Peak {
    pub peak: u32,
    /// Where the peak was (host, tenant or rack).
    pub at: String,
    pub cap: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    pub fleet: Peak,
    pub host_outbound: Peak,
    pub host_inbound: Peak,
    pub tenant: Peak,
    /// Concurrent migrations leaving each rack.
    pub rack_outbound: Peak,
    pub rack_starts_per_window: Peak,
    pub fleet_starts_per_window: Peak,
    /// Every time a cap was exceeded, in words; empty when none was.
    pub violations: Vec<String>,
}

fn bump<'a>(m: &mut HashMap<&'a str, u32>, k: &'a str, d: i32, peak: &mut Peak) {
    let n = m.entry(k).or_insert(0);
    *n = (*n as i32 + d) as u32;
    if *n > peak.peak {
        peak.peak = *n;
        peak.at = k.to_string();
    }
}

/// The most starts inside any window of `interval_ms`, per group.
fn starts_per_window<'a>(
    starts: impl Iterator<Item = (&'a str, u64)>,
    interval_ms: u64,
) -> (u32, String) {
    let mut by: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (k, t) in starts {
        by.entry(k).or_default().push(t);
    }
    let mut best = (0u32, String::new());
    for (k, mut ts) in by {
        ts.sort_unstable();
        let mut lo = 0;
        for hi in 0..ts.len() {
            while ts[hi] - ts[lo] >= interval_ms {
                lo += 1;
            }
            let n = (hi - lo + 1) as u32;
            if n > best.0 {
                best = (n, k.to_string());
            }
        }
    }
    best
}

pub fn audit(record: &[MigrationRecord], policies: &Policies) -> Audit {
    let caps = &policies.caps;
    let mut a = Audit {
        fleet: Peak {
            cap: Some(caps.fleet),
            at: "fleet".into(),
            ..Peak::default()
        },
        host_outbound: Peak {
            cap: Some(caps.host_outbound),
            ..Peak::default()
        },
        host_inbound: Peak {
            cap: Some(caps.host_inbound),
            ..Peak::default()
        },
        tenant: Peak {
            cap: Some(caps.per_tenant),
            ..Peak::default()
        },
        ..Audit::default()
    };
    // Ends sort before starts at the same instant: a slot freed at t may
    // be taken at t.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(record.len() * 2);
    for (i, r) in record.iter().enumerate() {
        events.push((r.started.ms(), 1, i));
        if let Some(e) = r.ended {
            events.push((e.ms(), 0, i));
        }
    }
    events.sort_unstable();
    let (mut out, mut inb, mut ten, mut rack) = (
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    let mut fleet: HashMap<&str, u32> = HashMap::new();
    for (t, kind, i) in events {
        let r = &record[i];
        let d = if kind == 1 { 1 } else { -1 };
        bump(&mut out, &r.source, d, &mut a.host_outbound);
        bump(&mut inb, &r.target, d, &mut a.host_inbound);
        bump(&mut ten, &r.tenant, d, &mut a.tenant);
        bump(&mut rack, &r.source_rack, d, &mut a.rack_outbound);
        bump(&mut fleet, "fleet", d, &mut a.fleet);
        if kind == 1 {
            let checks = [
                (
                    "outbound on host",
                    &r.source,
                    out[r.source.as_str()],
                    caps.host_outbound,
                ),
                (
                    "inbound on host",
                    &r.target,
                    inb[r.target.as_str()],
                    caps.host_inbound,
                ),
                (
                    "of tenant",
                    &r.tenant,
                    ten[r.tenant.as_str()],
                    caps.per_tenant,
                ),
            ];
            for (what, who, n, cap) in checks {
                if n > cap {
                    a.violations.push(format!(
                        "{n} migrations {what} {who} at {:.3} s (cap {cap})",
                        t as f64 / 1e3
                    ));
                }
            }
            if fleet["fleet"] > caps.fleet {
                a.violations.push(format!(
                    "{} migrations in the fleet at {:.3} s (cap {})",
                    fleet["fleet"],
                    t as f64 / 1e3,
                    caps.fleet
                ));
            }
        }
    }
    let p = &policies.pacing;
    let (n, rack) = starts_per_window(
        record
            .iter()
            .map(|r| (r.source_rack.as_str(), r.started.ms())),
        p.per_rack.interval_ms,
    );
    a.rack_starts_per_window = Peak {
        peak: n,
        at: rack,
        cap: Some(p.per_rack.max_starts),
    };
    let (n, _) = starts_per_window(
        record.iter().map(|r| ("fleet", r.started.ms())),
        p.fleet.interval_ms,
    );
    a.fleet_starts_per_window = Peak {
        peak: n,
        at: "fleet".into(),
        cap: Some(p.fleet.max_starts),
    };
    for (what, peak) in [
        ("a rack's starts per window", &a.rack_starts_per_window),
        ("the fleet's starts per window", &a.fleet_starts_per_window),
    ] {
        if let Some(cap) = peak.cap {
            if peak.peak > cap {
                a.violations
                    .push(format!("{what}: {} in {} (cap {cap})", peak.peak, peak.at));
            }
        }
    }
    a
}
