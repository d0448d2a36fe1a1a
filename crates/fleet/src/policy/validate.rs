//! Checks a whole policy before anything uses it.

use super::{Pace, Policies};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {field} = {value}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot read the policy {input:?}: {why}")]
    Parse { input: String, why: String },
}

fn invalid(field: &'static str, value: impl ToString, why: &'static str) -> PolicyError {
    PolicyError::Invalid {
        field,
        value: value.to_string(),
        why,
    }
}

const AT_LEAST_ONE: &str = "must be at least 1 (0 would let nothing move)";

fn pace(p: &Pace, starts: &'static str, interval: &'static str) -> Result<(), PolicyError> {
    if p.max_starts == 0 {
        return Err(invalid(starts, p.max_starts, AT_LEAST_ONE));
    }
    if p.interval_ms == 0 || p.interval_ms > 3_600_000 {
        return Err(invalid(
            interval,
            format!("{} ms", p.interval_ms),
            "must be from 1 ms to 1 h",
        ));
    }
    Ok(())
}

impl Policies {
    /// The first invalid value, or Ok.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let c = &self.caps;
        for (field, v) in [
            ("caps.host_outbound", c.host_outbound),
            ("caps.host_inbound", c.host_inbound),
            ("caps.per_tenant", c.per_tenant),
            ("caps.fleet", c.fleet),
        ] {
            if v == 0 {
                return Err(invalid(field, v, AT_LEAST_ONE));
            }
        }
        if self.headroom_percent >= 100 {
            return Err(invalid(
                "headroom_percent",
                self.headroom_percent,
                "must be below 100 (100% headroom leaves no host room for any VM)",
            ));
        }
        pace(
            &self.pacing.per_rack,
            "pacing.per_rack.max_starts",
            "pacing.per_rack.interval_ms",
        )?;
        pace(
            &self.pacing.fleet,
            "pacing.fleet.max_starts",
            "pacing.fleet.interval_ms",
        )?;
        let r = &self.retries;
        if r.max_attempts == 0 || r.max_attempts > 100 {
            return Err(invalid(
                "retries.max_attempts",
                r.max_attempts,
                "must be from 1 to 100",
            ));
        }
        if r.completion_timeout_per_gib_ms < 1_000 {
            return Err(invalid(
                "retries.completion_timeout_per_gib_ms",
                r.completion_timeout_per_gib_ms,
                "must be at least 1000 ms (no migration of a GiB finishes sooner)",
            ));
        }
        if r.min_completion_timeout_ms < 1_000 {
            return Err(invalid(
                "retries.min_completion_timeout_ms",
                r.min_completion_timeout_ms,
                "must be at least 1000 ms",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        Policies::default().validate().unwrap();
    }

    #[test]
    fn each_bad_value_is_named() {
        let mut p = Policies::default();
        p.caps.host_inbound = 0;
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("caps.host_inbound = 0"), "{e}");
        assert!(e.contains("at least 1"), "{e}");

        let p = Policies {
            headroom_percent: 100,
            ..Policies::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("headroom"));

        let mut p = Policies::default();
        p.pacing.per_rack.interval_ms = 0;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pacing.per_rack.interval_ms"));

        let mut p = Policies::default();
        p.retries.max_attempts = 0;
        assert!(p.validate().is_err());
    }
}
