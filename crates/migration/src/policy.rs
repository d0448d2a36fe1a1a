//! Pure decisions of a pre-copy migration, from measurements only: when to
//! switch over (the predicted blackout fits the target), and when the guest
//! outruns the link and must be braked (auto-converge). No I/O here, so
//! every rule is unit-tested with made-up rounds.

use std::time::Duration;

/// Live rounds taken to shorten a blackout that already fits the target.
const MAX_EXTRA_ROUNDS: u32 = 3;
/// Hybrid moves to post-copy when the guest dirties at least this share
/// of what the link sends.
pub const HYBRID_DIRTY_RATIO: f64 = 0.5;

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The blackout the operator accepts (`--downtime`).
    pub downtime_target: Duration,
    /// What a blackout costs besides sending pages: saving, sending and
    /// loading the state, the commit round trip, restarting the vCPUs.
    pub fixed_blackout: Duration,
    /// `--max-downtime`: a hard limit. A migration whose predicted blackout
    /// stays above it once the brake has done what it may is abandoned,
    /// the VM running on the source, instead of taking a longer blackout.
    pub max_downtime: Option<Duration>,
    /// Brake a guest that outruns the link instead of looping forever.
    pub auto_converge: bool,
    /// First brake, and the step it grows by each round without progress.
    pub throttle_start: u32,
    pub throttle_step: u32,
    pub throttle_max: u32,
    /// After this many rounds the blackout is taken whatever it costs: a
    /// migration must finish.
    pub max_rounds: u32,
    /// Hybrid: when pre-copy does not converge, switch to post-copy
    /// instead of braking the guest.
    pub postcopy_fallback: bool,
    /// Hybrid: switch to post-copy after this many rounds, or this long,
    /// whatever the rounds look like.
    pub hybrid_max_rounds: u32,
    pub hybrid_max_time: Duration,
    /// Whether auto mode may choose post-copy: during a post-copy the VM
    /// runs on the destination while its memory is still on the source, so
    /// a crash of either host loses it. Only the VM's policy (or the
    /// operator's `--allow-postcopy`) says so; an explicit post-copy or
    /// hybrid mode is the operator's own choice.
    pub allow_postcopy: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(20),
            fixed_blackout: Duration::from_millis(2),
            max_downtime: None,
            auto_converge: true,
            throttle_start: 30,
            throttle_step: 20,
            throttle_max: 99,
            max_rounds: 40,
            postcopy_fallback: false,
            allow_postcopy: false,
            hybrid_max_rounds: 10,
            hybrid_max_time: Duration::from_secs(10),
        }
    }
}

/// What the engine measured up to the harvest that ends a round.
#[derive(Debug, Clone, Copy)]
pub struct RoundFacts {
    /// The round just sent (1 = the full pass).
    pub round: u32,
    /// Bytes dirtied since the previous harvest: what is left to send.
    pub dirty_bytes: u64,
    /// Time since the previous harvest.
    pub elapsed: Duration,
    /// The send rate the last round achieved, bytes/s.
    pub send_rate: f64,
    /// Time since the first round started.
    pub since_start: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Pause and send what is left.
    Switchover { predicted: Duration, forced: bool },
    /// Send another round, with this brake on the guest.
    NextRound { predicted: Duration, throttle: u32 },
    /// The blackout would stay above `max_downtime`: give up, the VM
    /// running on the source.
    GiveUp { predicted: Duration },
    /// Hybrid: pre-copy will not get there; move the VM now and let its
    /// memory follow.
    StartPostcopy {
        predicted: Duration,
        reason: &'static str,
    },
}

#[derive(Debug)]
pub struct Policy {
    config: PolicyConfig,
    previous_dirty: Option<u64>,
    throttle: u32,
    stuck_at_max: u32,
    /// Rounds taken after the prediction already fit the target.
    extra_rounds: u32,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            previous_dirty: None,
            throttle: 0,
            stuck_at_max: 0,
            extra_rounds: 0,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// A new target from the operator, for the rounds still to come.
    pub fn set_downtime_target(&mut self, target: Duration) {
        self.config.downtime_target = target;
    }

    /// What a blackout costs besides the last pages, as measured on this
    /// migration so far (see [`fixed_costs`]).
    pub fn set_fixed_blackout(&mut self, fixed: Duration) {
        self.config.fixed_blackout = fixed;
    }

    /// A forced switchover, unless it would break the hard limit.
    fn force(&self, predicted: Duration) -> Decision {
        match self.config.max_downtime {
            Some(max) if predicted > max => Decision::GiveUp { predicted },
            _ => Decision::Switchover {
                predicted,
                forced: true,
            },
        }
    }

    /// The blackout sending `bytes` at `rate` would cost.
    pub fn predict(&self, bytes: u64, rate: f64) -> Duration {
        let send = if rate > 0.0 {
            Duration::from_secs_f64(bytes as f64 / rate)
        } else if bytes == 0 {
            Duration::ZERO
        } else {
            Duration::MAX / 4
        };
        self.config.fixed_blackout.saturating_add(send)
    }

    pub fn decide(&mut self, facts: RoundFacts) -> Decision {
        let predicted = self.predict(facts.dirty_bytes, facts.send_rate);
        let previous = self.previous_dirty.replace(facts.dirty_bytes);
        let dirty_rate = facts.dirty_bytes as f64 / facts.elapsed.as_secs_f64().max(1e-6);
        if predicted <= self.config.downtime_target {
            // It fits. One more live round is still worth it when it would
            // leave a clearly shorter blackout: sending these pages live
            // takes a while, and the guest dirties only so much meanwhile.
            let send_secs = facts.dirty_bytes as f64 / facts.send_rate.max(1.0);
            let next = self.predict((dirty_rate * send_secs) as u64, facts.send_rate);
            let worth_it = next.as_secs_f64() < 0.6 * predicted.as_secs_f64();
            if worth_it
                && self.extra_rounds < MAX_EXTRA_ROUNDS
                && facts.round < self.config.max_rounds
            {
                self.extra_rounds += 1;
                return Decision::NextRound {
                    predicted,
                    throttle: self.throttle,
                };
            }
            return Decision::Switchover {
                predicted,
                forced: false,
            };
        }
        // Rounds that no longer shrink, or a guest that writes about as fast
        // as we send, will not converge by themselves.
        let outrunning = facts.send_rate > 0.0 && dirty_rate >= 0.9 * facts.send_rate;
        let not_shrinking = facts.round >= 3
            && previous.is_some_and(|p| facts.dirty_bytes as f64 >= 0.9 * p as f64);
        if self.config.postcopy_fallback {
            // Pre-copy resends what the guest dirties meanwhile: at a dirty
            // rate of half the send rate it sends everything left twice
            // over, while post-copy sends each page once.
            let costly =
                facts.send_rate > 0.0 && dirty_rate >= HYBRID_DIRTY_RATIO * facts.send_rate;
            let reason = if outrunning {
                Some("the guest dirties memory about as fast as the link sends it")
            } else if costly {
                Some("the guest dirties memory at over half the send rate: pre-copy would resend most of it")
            } else if not_shrinking {
                Some("the rounds stopped shrinking")
            } else if facts.round >= self.config.hybrid_max_rounds {
                Some("the round limit was reached")
            } else if facts.since_start >= self.config.hybrid_max_time {
                Some("the time limit was reached")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Decision::StartPostcopy { predicted, reason };
            }
        }
        if facts.round >= self.config.max_rounds {
            return self.force(predicted);
        }
        if self.config.auto_converge && (outrunning || not_shrinking) {
            if self.throttle >= self.config.throttle_max {
                self.stuck_at_max += 1;
                if self.stuck_at_max >= 3 {
                    return self.force(predicted);
                }
            }
            self.throttle = if self.throttle == 0 {
                self.config.throttle_start
            } else {
                self.throttle + self.config.throttle_step
            }
            .min(self.config.throttle_max);
        }
        Decision::NextRound {
            predicted,
            throttle: self.throttle,
        }
    }
}

/// What a blackout costs besides sending the last pages, from what this
/// migration measured: waking the engine's thread, harvesting the dirty
/// log (as long as the last live harvest took), saving and loading the
/// state (per vCPU, as measured on these hosts: about 0.15 ms to save and
/// 0.3 ms to load), sending it at the link's rate, the two waits on the
/// link (StateLoaded, then half a round trip for the Commit), and starting
/// the vCPUs there.
pub fn fixed_costs(harvest: Duration, round_trip: Duration, rate: f64, vcpus: u32) -> Duration {
    const WAKE: Duration = Duration::from_micros(50);
    const SAVE_PER_VCPU: Duration = Duration::from_micros(150);
    const LOAD_PER_VCPU: Duration = Duration::from_micros(300);
    const RESUME: Duration = Duration::from_micros(100);
    const STATE_BYTES_PER_VCPU: f64 = 12.0 * 1024.0;
    let vcpus = vcpus.max(1);
    let state = Duration::from_secs_f64(STATE_BYTES_PER_VCPU * f64::from(vcpus) / rate.max(1.0));
    WAKE + harvest
        + (SAVE_PER_VCPU + LOAD_PER_VCPU) * vcpus
        + state
        + round_trip
        + round_trip / 2
        + RESUME
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GBPS: f64 = 3e9;

    fn facts(round: u32, dirty_mib: u64, elapsed_ms: u64) -> RoundFacts {
        RoundFacts {
            round,
            dirty_bytes: dirty_mib * MIB,
            elapsed: Duration::from_millis(elapsed_ms),
            send_rate: GBPS,
            since_start: Duration::from_millis(elapsed_ms),
        }
    }

    fn target(ms: u64) -> Policy {
        Policy::new(PolicyConfig {
            downtime_target: Duration::from_millis(ms),
            ..Default::default()
        })
    }

    #[test]
    fn an_idle_guest_switches_over_after_the_first_pass() {
        let mut p = target(10);
        let d = p.decide(facts(1, 0, 50));
        assert!(
            matches!(d, Decision::Switchover { forced: false, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn a_shrinking_dirty_set_converges_without_a_brake() {
        let mut p = target(10);
        // 1 GiB/s writer, 3 GB/s link: each round a third of the last.
        let d = p.decide(facts(1, 90, 90));
        assert_eq!(
            d,
            Decision::NextRound {
                predicted: p.predict(90 * MIB, GBPS),
                throttle: 0
            }
        );
        assert!(matches!(
            p.decide(facts(2, 30, 30)),
            Decision::NextRound { throttle: 0, .. }
        ));
        // 10 MiB at 3 GB/s is ~3.5 ms plus 2 ms fixed: under 10 ms, but one
        // more round (~3.5 ms, ~3.5 MiB dirtied) shortens the blackout.
        assert!(matches!(
            p.decide(facts(3, 10, 10)),
            Decision::NextRound { throttle: 0, .. }
        ));
        // 3.5 MiB: ~3.2 ms; a round more would save too little.
        let d = p.decide(RoundFacts {
            dirty_bytes: 7 * MIB / 2,
            elapsed: Duration::from_micros(3500),
            ..facts(4, 0, 0)
        });
        assert!(
            matches!(d, Decision::Switchover { forced: false, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_braked_harder_each_round() {
        let mut p = target(10);
        // Writes 3.2 GB/s against a 3 GB/s link.
        let mut throttles = Vec::new();
        for round in 1..=4 {
            match p.decide(facts(round, 256, 80)) {
                Decision::NextRound { throttle, .. } => throttles.push(throttle),
                d => panic!("round {round}: {d:?}"),
            }
        }
        assert_eq!(throttles, vec![30, 50, 70, 90]);
    }

    #[test]
    fn the_blackout_is_forced_when_nothing_else_helps() {
        let mut p = Policy::new(PolicyConfig {
            downtime_target: Duration::from_millis(1),
            max_rounds: 5,
            ..Default::default()
        });
        let mut last = None;
        for round in 1..=5 {
            last = Some(p.decide(facts(round, 100, 1000)));
        }
        assert!(matches!(
            last,
            Some(Decision::Switchover { forced: true, .. })
        ));
    }

    #[test]
    fn without_auto_converge_no_brake_is_applied() {
        let mut p = Policy::new(PolicyConfig {
            auto_converge: false,
            ..Default::default()
        });
        for round in 1..=3 {
            assert!(matches!(
                p.decide(facts(round, 256, 50)),
                Decision::NextRound { throttle: 0, .. }
            ));
        }
    }

    #[test]
    fn hybrid_moves_to_postcopy_instead_of_braking() {
        let mut p = Policy::new(PolicyConfig {
            postcopy_fallback: true,
            ..Default::default()
        });
        // Writing 3 GB/s against a 3 GB/s link: never converges.
        let d = p.decide(facts(1, 300, 100));
        assert!(
            matches!(d, Decision::StartPostcopy { reason, .. } if reason.contains("fast")),
            "{d:?}"
        );
        // A converging guest still finishes as pre-copy.
        let mut p = Policy::new(PolicyConfig {
            postcopy_fallback: true,
            ..Default::default()
        });
        assert!(matches!(
            p.decide(facts(1, 1, 100)),
            Decision::Switchover { forced: false, .. }
        ));
        // The round limit moves a slowly shrinking guest.
        let mut p = Policy::new(PolicyConfig {
            postcopy_fallback: true,
            hybrid_max_rounds: 2,
            ..Default::default()
        });
        assert!(matches!(
            p.decide(facts(1, 200, 1000)),
            Decision::NextRound { throttle: 0, .. }
        ));
        assert!(matches!(
            p.decide(facts(2, 100, 1000)),
            Decision::StartPostcopy { reason, .. } if reason.contains("round limit")
        ));
    }
}
