//! Pacing for one planning round: the starts inside each window, per
//! rack and fleet-wide, counting this round's own starts.

use std::collections::HashMap;

use crate::model::{Fleet, HostIx};
use crate::policy::Pacing;
use crate::time::Timestamp;

use super::{RecentStart, WaitReason};

pub struct PaceWindow<'a> {
    fleet: &'a Fleet,
    pacing: Pacing,
    per_rack: HashMap<&'a str, u32>,
    fleet_wide: u32,
}

impl<'a> PaceWindow<'a> {
    pub fn new(fleet: &'a Fleet, pacing: Pacing, recent: &[RecentStart], now: Timestamp) -> Self {
        let mut w = Self {
            fleet,
            pacing,
            per_rack: HashMap::new(),
            fleet_wide: 0,
        };
        for s in recent {
            // A start exactly `interval` ago is out of the window.
            let age = now.since(s.at);
            if s.at <= now && age < pacing.per_rack.interval_ms {
                *w.per_rack.entry(fleet.host(s.source).rack()).or_insert(0) += 1;
            }
            if s.at <= now && age < pacing.fleet.interval_ms {
                w.fleet_wide += 1;
            }
        }
        w
    }

    /// Why a migration off `source` may not start now, if pacing forbids it.
    pub fn check(&self, source: HostIx) -> Option<WaitReason> {
        if self.fleet_wide >= self.pacing.fleet.max_starts {
            return Some(WaitReason::PacedFleet {
                started: self.fleet_wide,
                interval_ms: self.pacing.fleet.interval_ms,
            });
        }
        let rack = self.fleet.host(source).rack();
        let n = self.per_rack.get(rack).copied().unwrap_or(0);
        (n >= self.pacing.per_rack.max_starts).then(|| WaitReason::PacedRack {
            rack: rack.to_string(),
            started: n,
            interval_ms: self.pacing.per_rack.interval_ms,
        })
    }

    pub fn count(&mut self, source: HostIx) {
        *self
            .per_rack
            .entry(self.fleet.host(source).rack())
            .or_insert(0) += 1;
        self.fleet_wide += 1;
    }
}
