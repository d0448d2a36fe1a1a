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
    /// The VM's policy lets auto mode choose post-copy.
    pub allow_postcopy: bool,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Post-copy is chosen only when pre-copy is predicted to take this many
/// times as long: post-copy makes the guest wait on the network for the
/// pages it touches first, and pre-copy costs the guest nothing while it
/// converges.
const POSTCOPY_GAIN: f64 = 1.5;

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
    let rates = format!(
        "the guest dirties {:.0} MiB/s, {:.0}% of the link's {:.0} MiB/s",
        f.dirty_rate / MIB,
        r * 100.0,
        b / MIB
    );
    let (mode, why) = if !f.allow_postcopy {
        (
            Mode::Precopy,
            format!(
                "{rates}; post-copy is not allowed for this VM (a crash of either host during it loses the VM), so pre-copy{}",
                if precopy.total_ms > POSTCOPY_GAIN * postcopy.total_ms {
                    format!(
                        ", though post-copy would take about {:.0} ms instead of {:.0}",
                        postcopy.total_ms, precopy.total_ms
                    )
                } else {
                    String::new()
                }
            ),
        )
    } else if r < 0.9 && precopy.total_ms <= POSTCOPY_GAIN * postcopy.total_ms {
        (
            Mode::Precopy,
            format!("{rates}: pre-copy converges and the guest never waits on the network"),
        )
    } else {
        (
            Mode::Postcopy,
            format!(
                "{rates}: pre-copy would resend most of memory ({:.0} ms predicted), post-copy sends each page once ({:.0} ms)",
                precopy.total_ms, postcopy.total_ms
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
            allow_postcopy: true,
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
    fn a_writer_at_half_the_link_goes_postcopy_where_it_saves_a_third() {
        // Pre-copy resends about as much as the first pass: nearly twice
        // post-copy's total.
        let (mode, p) = choose(&facts(145.0, 300.0));
        assert_eq!(mode, Mode::Postcopy, "{p:?}");
        // A light writer converges cheaply.
        let (mode, _) = choose(&facts(30.0, 300.0));
        assert_eq!(mode, Mode::Precopy);
    }

    #[test]
    fn without_the_policy_auto_never_chooses_postcopy_and_says_why() {
        let f = AutoFacts {
            allow_postcopy: false,
            ..facts(200.0, 300.0)
        };
        let (mode, p) = choose(&f);
        assert_eq!(mode, Mode::Precopy);
        assert!(p.why.contains("not allowed"), "{}", p.why);
        assert!(p.why.contains("post-copy would take"), "{}", p.why);
        assert_eq!(p.chosen, "precopy");
    }

    #[test]
    fn a_writer_beyond_the_link_needs_a_brake_in_precopy() {
        let (_, p) = choose(&facts(400.0, 300.0));
        assert!(p.modes[0].guest_cost.contains("brake"), "{p:?}");
    }
}
