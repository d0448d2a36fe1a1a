//! Auto mode's choice, from measurements only: how much memory may hold
//! data, how fast the guest dirties it, how fast the link sends. Each mode
//! gets a predicted total time and blackout; pre-copy wins while it
//! converges cheaply (it never makes the guest wait on the network),
//! post-copy when pre-copy would resend most of memory.

use std::time::Duration;

use crate::mode::Mode;
use crate::policy::HYBRID_DIRTY_RATIO;
use crate::stats::{ModePrediction, Prediction};

/// What was measured before choosing.
#[derive(Debug, Clone, Copy)]
pub struct AutoFacts {
    pub populated_bytes: u64,
    /// Bytes per second the guest dirtied over the sample.
    pub dirty_rate: f64,
    /// Bytes per second the link is expected to carry.
    pub link_rate: f64,
    pub link_rate_measured: bool,
    pub sample: Duration,
    pub downtime_target: Duration,
    /// What a blackout costs besides pages (state, commit, restart).
    pub fixed_blackout: Duration,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Predicts every mode and picks one.
pub fn choose(f: &AutoFacts) -> (Mode, Prediction) {
    let b = f.link_rate.max(1.0);
    let r = f.dirty_rate / b;
    let first_pass_ms = f.populated_bytes as f64 / b * 1e3;
    // Every total includes the sample just taken, as the report's does.
    let sample_ms = f.sample.as_secs_f64() * 1e3;
    let fixed_ms = f.fixed_blackout.as_secs_f64() * 1e3;
    let target_ms = f.downtime_target.as_secs_f64() * 1e3;
    let precopy = if r < 0.9 {
        ModePrediction {
            mode: "precopy".into(),
            // Each round resends what the last one let the guest dirty.
            total_ms: sample_ms + first_pass_ms / (1.0 - r),
            blackout_ms: target_ms,
            guest_cost: "none".into(),
        }
    } else {
        ModePrediction {
            mode: "precopy".into(),
            // Braking takes a few rounds before the rounds shrink.
            total_ms: sample_ms + first_pass_ms * 4.0,
            blackout_ms: target_ms,
            guest_cost: "auto-converge must brake the guest".into(),
        }
    };
    // What the guest rewrites while the first pass runs, sent once more.
    let resent_ms = (f.dirty_rate * first_pass_ms / 1e3).min(f.populated_bytes as f64) / b * 1e3;
    let faults = |ms: f64| format!("vCPUs wait on missing pages for up to {ms:.0} ms");
    let postcopy = ModePrediction {
        mode: "postcopy".into(),
        total_ms: sample_ms + first_pass_ms + fixed_ms,
        blackout_ms: fixed_ms,
        guest_cost: faults(first_pass_ms),
    };
    let hybrid = if r < HYBRID_DIRTY_RATIO {
        ModePrediction {
            mode: "hybrid".into(),
            ..precopy.clone()
        }
    } else {
        ModePrediction {
            mode: "hybrid".into(),
            total_ms: sample_ms + first_pass_ms + resent_ms + fixed_ms,
            blackout_ms: fixed_ms,
            guest_cost: faults(resent_ms),
        }
    };
    let (mode, why) = if r < HYBRID_DIRTY_RATIO {
        (
            Mode::Precopy,
            format!(
                "the guest dirties {:.0} MiB/s, {:.0}% of the link's {:.0} MiB/s: pre-copy converges and the guest never waits on the network",
                f.dirty_rate / MIB,
                r * 100.0,
                b / MIB
            ),
        )
    } else {
        (
            Mode::Postcopy,
            format!(
                "the guest dirties {:.0} MiB/s, {:.0}% of the link's {:.0} MiB/s: pre-copy would resend most of memory, post-copy sends each page once",
                f.dirty_rate / MIB,
                r * 100.0,
                b / MIB
            ),
        )
    };
    let prediction = Prediction {
        sample_ms: f.sample.as_secs_f64() * 1e3,
        dirty_rate_mibs: f.dirty_rate / MIB,
        link_rate_mibs: b / MIB,
        link_rate_measured: f.link_rate_measured,
        populated_mib: f.populated_bytes as f64 / MIB,
        modes: vec![precopy, postcopy, hybrid],
        chosen: mode.name().into(),
        why,
    };
    (mode, prediction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dirty_mibs: f64, link_mibs: f64) -> AutoFacts {
        AutoFacts {
            populated_bytes: 300 << 20,
            dirty_rate: dirty_mibs * MIB,
            link_rate: link_mibs * MIB,
            link_rate_measured: false,
            sample: Duration::from_millis(100),
            downtime_target: Duration::from_millis(20),
            fixed_blackout: Duration::from_millis(2),
        }
    }

    #[test]
    fn an_idle_guest_goes_precopy() {
        let (mode, p) = choose(&facts(0.0, 1000.0));
        assert_eq!(mode, Mode::Precopy);
        assert_eq!(p.modes.len(), 3);
        assert!((p.modes[0].total_ms - 400.0).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn a_writer_that_outruns_a_capped_link_goes_postcopy() {
        let (mode, p) = choose(&facts(200.0, 300.0));
        assert_eq!(mode, Mode::Postcopy);
        assert!(p.why.contains("each page once"), "{}", p.why);
        let pre = &p.modes[0];
        let post = &p.modes[1];
        assert!(post.total_ms < pre.total_ms, "{p:?}");
        assert!(post.blackout_ms < pre.blackout_ms);
    }

    #[test]
    fn a_writer_beyond_the_link_needs_a_brake_in_precopy() {
        let (_, p) = choose(&facts(400.0, 300.0));
        assert!(p.modes[0].guest_cost.contains("brake"), "{p:?}");
    }
}
