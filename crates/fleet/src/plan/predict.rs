//! How long a migration takes, predicted from the VM's measured dirty rate
//! and the link, with the pre-copy model of crates/migration/src/auto.rs:
//! the first pass sends the populated memory, and each round resends what
//! the guest dirtied during the one before, so the bytes sent sum to
//! populated / (1 - dirty/link) while the guest dirties under 90% of the
//! link; beyond that auto-converge brakes it, and pre-copy sends about four
//! passes' worth. Fixed costs come from `ferry bench` here (README.md): an
//! idle 1 GiB VM, with next to nothing populated, moves in 13.4 ms, so
//! setup is ~12 ms; the blackout is 1-4.5 ms host-side in every row, so
//! 2 ms. A 768 MiB fill moved at 11.7 Gbit/s in 565 ms: 550 ms of pages
//! plus the setup, which this model gives within 1%. A dirtying guest
//! measured slower than the model (dirty-100: 306 ms against ~210 ms)
//! because write-protect faults slow the guest's writes and the harvest
//! costs CPU; the model does not charge those.
//!
//! Between real agents the setup is not 12 ms but seconds: the
//! destination's agent starts a VMM process for the VM and reserves its
//! memory before the first page, and the agents make their API round
//! trips. Each agent measures that on its own incoming migrations and
//! reports it with its host (`Host::receive_setup`); the prediction of a
//! move charges the setup of the host it goes to. A host that reported
//! none (an operator's record, a simulation) is charged SETUP_MS.

use serde::{Deserialize, Serialize};

use crate::model::Host;

/// Setup before the first page: the offer, the reservation, the receiver.
pub const SETUP_MS: f64 = 12.0;
/// The blackout's fixed part: state save, transfer, load, commit.
pub const BLACKOUT_MS: f64 = 2.0;
/// Beyond this share of the link pre-copy is braked.
pub const BRAKE_RATIO: f64 = 0.9;
/// What a braked pre-copy sends, in first passes.
pub const BRAKED_PASSES: f64 = 4.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Predicted {
    /// Bytes pre-copy sends in all.
    pub bytes: u64,
    pub total_ms: f64,
    pub braked: bool,
}

/// The bytes a pre-copy of this VM sends over a link of `link_rate`.
pub fn bytes_to_send(populated: u64, dirty_rate: u64, link_rate: u64) -> (u64, bool) {
    let r = dirty_rate as f64 / link_rate.max(1) as f64;
    if r < BRAKE_RATIO {
        ((populated as f64 / (1.0 - r)) as u64, false)
    } else {
        ((populated as f64 * BRAKED_PASSES) as u64, true)
    }
}

/// What a move of a VM of `mem_bytes` from `source` to `target` costs
/// besides its pages and blackout: the target's measured cost of
/// receiving it (else SETUP_MS: none known, or no target chosen yet) and
/// the source's measured cost of sending (else nothing).
pub fn setup_ms(source: Option<&Host>, target: Option<&Host>, mem_bytes: u64) -> f64 {
    let receive = target
        .and_then(|h| h.receive_setup)
        .map_or(SETUP_MS, |s| s.ms(mem_bytes).max(0.0));
    let send = source.and_then(|h| h.send_setup_ms).unwrap_or(0.0).max(0.0);
    receive + send
}

/// A migration of this VM alone on a link of `link_rate` bytes/s, after
/// a setup of `setup_ms` (see [`setup_ms`]).
pub fn predict(setup_ms: f64, populated: u64, dirty_rate: u64, link_rate: u64) -> Predicted {
    let (bytes, braked) = bytes_to_send(populated, dirty_rate, link_rate);
    Predicted {
        bytes,
        total_ms: setup_ms + bytes as f64 / link_rate.max(1) as f64 * 1e3 + BLACKOUT_MS,
        braked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MIB;

    #[test]
    fn matches_the_bench_figures() {
        // fill-768-prealloc: 768 MiB at 11.7 Gbit/s took 565 ms.
        let link = (11.7e9 / 8.0) as u64;
        let p = predict(SETUP_MS, 768 * MIB, 0, link);
        assert!((p.total_ms - 565.0).abs() < 0.02 * 565.0, "{p:?}");
        // idle: next to nothing populated, 13.4 ms.
        let p = predict(SETUP_MS, MIB, 0, link);
        assert!((p.total_ms - 13.4).abs() < 2.0, "{p:?}");
        // A guest dirtying half the link sends twice its memory.
        let p = predict(SETUP_MS, 100 * MIB, link / 2, link);
        assert_eq!(p.bytes, 200 * MIB);
        assert!(predict(SETUP_MS, 100 * MIB, link, link).braked);
    }

    #[test]
    fn a_target_that_measured_its_setup_is_charged_it() {
        use crate::model::{ReceiveSetup, GIB};
        let mut h = crate::sim::fixtures::host("h", "r1", 16);
        let mut src = crate::sim::fixtures::host("s", "r2", 16);
        assert_eq!(
            setup_ms(Some(&src), Some(&h), GIB),
            SETUP_MS,
            "nothing reported"
        );
        assert_eq!(setup_ms(None, None, GIB), SETUP_MS, "no target yet");
        h.receive_setup = Some(ReceiveSetup {
            fixed_ms: 900.0,
            per_gib_ms: 2800.0,
            samples: 3,
        });
        assert_eq!(setup_ms(Some(&src), Some(&h), GIB / 2), 2300.0);
        // The source's own part adds to it.
        src.send_setup_ms = Some(200.0);
        assert_eq!(setup_ms(Some(&src), Some(&h), GIB / 2), 2500.0);
        assert_eq!(setup_ms(Some(&src), None, GIB), SETUP_MS + 200.0);
        src.send_setup_ms = None;
        // 512 MiB idle on 10 Gbit/s: 2.3 s of setup, 430 ms of pages.
        let link = 1_250_000_000;
        let p = predict(setup_ms(Some(&src), Some(&h), GIB / 2), 512 * MIB, 0, link);
        let pages = 512.0 * MIB as f64 / link as f64 * 1e3;
        assert!(
            (p.total_ms - (2300.0 + pages + BLACKOUT_MS)).abs() < 1e-6,
            "{p:?}"
        );
    }
}
