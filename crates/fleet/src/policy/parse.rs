//! Policy overrides as one line, the form `--caps` takes:
//! `out=2,in=1,tenant=4,fleet=50,rack-pace=20/10s,fleet-pace=100/10s,headroom=10,attempts=3`.

use super::{Pace, Policies, PolicyError};

fn parse_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Parse {
        input: input.to_string(),
        why: why.into(),
    }
}

fn number(input: &str, key: &str, v: &str) -> Result<u32, PolicyError> {
    v.trim_end_matches('%')
        .parse()
        .map_err(|_| parse_err(input, format!("{key}={v}: expected a whole number")))
}

/// `N/INTERVAL` with the interval in ms or s: `20/10s`, `5/500ms`.
fn pace(input: &str, key: &str, v: &str) -> Result<Pace, PolicyError> {
    let bad = || {
        parse_err(
            input,
            format!("{key}={v}: expected STARTS/INTERVAL, e.g. 20/10s"),
        )
    };
    let (n, interval) = v.split_once('/').ok_or_else(bad)?;
    let max_starts = n.parse().map_err(|_| bad())?;
    let interval_ms = if let Some(ms) = interval.strip_suffix("ms") {
        ms.parse::<u64>().map_err(|_| bad())?
    } else if let Some(s) = interval.strip_suffix('s') {
        let s: f64 = s.parse().map_err(|_| bad())?;
        if !(s.is_finite() && s >= 0.0) {
            return Err(bad());
        }
        (s * 1e3).round() as u64
    } else {
        return Err(bad());
    };
    Ok(Pace {
        max_starts,
        interval_ms,
    })
}

impl Policies {
    /// These policies with the overrides in `spec` applied, validated; an
    /// unknown key or a bad value changes nothing.
    pub fn with_overrides(&self, spec: &str) -> Result<Policies, PolicyError> {
        let mut p = self.clone();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, v) = part
                .split_once('=')
                .ok_or_else(|| parse_err(spec, format!("{part}: expected KEY=VALUE")))?;
            match key {
                "out" => p.caps.host_outbound = number(spec, key, v)?,
                "in" => p.caps.host_inbound = number(spec, key, v)?,
                "tenant" => p.caps.per_tenant = number(spec, key, v)?,
                "fleet" => p.caps.fleet = number(spec, key, v)?,
                "headroom" => p.headroom_percent = number(spec, key, v)?,
                "attempts" => p.retries.max_attempts = number(spec, key, v)?,
                "rack-pace" => p.pacing.per_rack = pace(spec, key, v)?,
                "fleet-pace" => p.pacing.fleet = pace(spec, key, v)?,
                _ => {
                    return Err(parse_err(
                        spec,
                        format!("unknown key {key}; known: out, in, tenant, fleet, headroom, attempts, rack-pace, fleet-pace"),
                    ))
                }
            }
        }
        p.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_are_checked() {
        let p = Policies::default()
            .with_overrides("out=1,in=3,tenant=2,fleet=9,rack-pace=5/500ms,fleet-pace=50/2s")
            .unwrap();
        assert_eq!(p.caps.host_outbound, 1);
        assert_eq!(p.caps.host_inbound, 3);
        assert_eq!(p.caps.per_tenant, 2);
        assert_eq!(p.caps.fleet, 9);
        assert_eq!(p.pacing.per_rack.interval_ms, 500);
        assert_eq!(p.pacing.fleet.interval_ms, 2000);
        for bad in [
            "out=0",
            "bogus=1",
            "out",
            "rack-pace=5",
            "rack-pace=5/3h",
            "in=-1",
        ] {
            assert!(Policies::default().with_overrides(bad).is_err(), "{bad}");
        }
    }
}
