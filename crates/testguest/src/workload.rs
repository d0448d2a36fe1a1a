//! The guest's workloads, in the syntax of its `workload=` command-line key
//! (`guest/README.md`, "Command line"): `idle` or
//! `dirty:WS_MB:RATE[:FILL_MB]`, RATE in MiB/s or `max`.
//!
//! [`Workload`] parses exactly what the guest accepts (digits only, RATE
//! above 0, at most 16 TiB in all) and prints the form the guest reads, so
//! a workload refused here would have been refused by the guest too, only
//! later and inside a VM.

use std::fmt;
use std::str::FromStr;

const MIB: u64 = 1 << 20;
/// WS_MB + FILL_MB the guest accepts at most (16 TiB), in MiB.
const LIMIT_MIB: u64 = 16 << 20;
const SYNTAX: &str = "idle or dirty:WS_MB:RATE[:FILL_MB] (RATE in MiB/s or max)";

/// How fast a dirty workload rewrites its working set, summed over vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// MiB/s (above 0).
    MibPerSec(u64),
    /// As fast as the vCPUs can.
    Max,
}

/// What the guest does once booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Nothing but heartbeats.
    Idle,
    /// Rewrite a `ws_mib` MiB working set at `rate`, verifying every page
    /// before rewriting it; `fill_mib` MiB of static data after it are
    /// re-verified continuously.
    Dirty {
        ws_mib: u64,
        rate: Rate,
        fill_mib: u64,
    },
}

/// Why a workload string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("empty workload: want {SYNTAX}")]
    Empty,
    #[error("unknown workload kind {0:?}: want {SYNTAX}")]
    UnknownKind(String),
    #[error("the idle workload takes no parameters, got {0:?}")]
    IdleWithParameters(String),
    #[error("dirty workload without {0}: want dirty:WS_MB:RATE[:FILL_MB]")]
    MissingField(&'static str),
    #[error("dirty workload with {0} fields: want at most 3, dirty:WS_MB:RATE[:FILL_MB]")]
    TooManyFields(usize),
    #[error("{field} {value:?} is not a decimal number (digits only, below 2^64)")]
    NotANumber { field: &'static str, value: String },
    #[error("RATE must be above 0 MiB/s (or max)")]
    ZeroRate,
    #[error("WS_MB + FILL_MB is {0} MiB, above the 16 TiB the guest supports")]
    TooLarge(u128),
}

impl Workload {
    /// Guest memory the workload occupies: working set plus fill region.
    /// The guest also needs its image below it: see
    /// [`crate::guest_mem_needed`].
    pub fn bytes_needed(&self) -> u64 {
        match *self {
            Workload::Idle => 0,
            Workload::Dirty {
                ws_mib, fill_mib, ..
            } => ws_mib.saturating_add(fill_mib).saturating_mul(MIB),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::MibPerSec(r) => write!(f, "{r}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

impl FromStr for Rate {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        match number("RATE", s)? {
            0 => Err(WorkloadError::ZeroRate),
            r => Ok(Rate::MibPerSec(r)),
        }
    }
}

/// The exact command-line form; FILL_MB is left out when it is 0.
impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Idle => f.write_str("idle"),
            Workload::Dirty {
                ws_mib,
                rate,
                fill_mib: 0,
            } => write!(f, "dirty:{ws_mib}:{rate}"),
            Workload::Dirty {
                ws_mib,
                rate,
                fill_mib,
            } => write!(f, "dirty:{ws_mib}:{rate}:{fill_mib}"),
        }
    }
}

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(WorkloadError::Empty);
        }
        let (kind, params) = match s.split_once(':') {
            Some((kind, params)) => (kind, Some(params)),
            None => (s, None),
        };
        match kind {
            "idle" => match params {
                None => Ok(Workload::Idle),
                Some(p) => Err(WorkloadError::IdleWithParameters(p.to_owned())),
            },
            "dirty" => {
                let fields: Vec<&str> = params.map(|p| p.split(':').collect()).unwrap_or_default();
                match fields.len() {
                    0 => return Err(WorkloadError::MissingField("WS_MB")),
                    1 => return Err(WorkloadError::MissingField("RATE")),
                    2 | 3 => {}
                    n => return Err(WorkloadError::TooManyFields(n)),
                }
                let ws_mib = number("WS_MB", fields[0])?;
                let rate = fields[1].parse()?;
                let fill_mib = fields
                    .get(2)
                    .map(|f| number("FILL_MB", f))
                    .transpose()?
                    .unwrap_or(0);
                let total = u128::from(ws_mib) + u128::from(fill_mib);
                if total > u128::from(LIMIT_MIB) {
                    return Err(WorkloadError::TooLarge(total));
                }
                Ok(Workload::Dirty {
                    ws_mib,
                    rate,
                    fill_mib,
                })
            }
            other => Err(WorkloadError::UnknownKind(other.to_owned())),
        }
    }
}

/// A decimal number as the guest reads one: digits only, fits in u64.
fn number(field: &'static str, s: &str) -> Result<u64, WorkloadError> {
    let bad = || WorkloadError::NotANumber {
        field,
        value: s.to_owned(),
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Workload, WorkloadError> {
        s.parse()
    }

    #[test]
    fn parses_every_documented_form() {
        assert_eq!(parse("idle"), Ok(Workload::Idle));
        assert_eq!(
            parse("dirty:256:100"),
            Ok(Workload::Dirty {
                ws_mib: 256,
                rate: Rate::MibPerSec(100),
                fill_mib: 0
            })
        );
        assert_eq!(
            parse("dirty:64:max"),
            Ok(Workload::Dirty {
                ws_mib: 64,
                rate: Rate::Max,
                fill_mib: 0
            })
        );
        assert_eq!(
            parse("dirty:32:100:64"),
            Ok(Workload::Dirty {
                ws_mib: 32,
                rate: Rate::MibPerSec(100),
                fill_mib: 64
            })
        );
        // An empty working set with only a fill region is allowed.
        assert_eq!(
            parse("dirty:0:5:8"),
            Ok(Workload::Dirty {
                ws_mib: 0,
                rate: Rate::MibPerSec(5),
                fill_mib: 8
            })
        );
    }

    #[test]
    fn display_is_the_command_line_form_and_round_trips() {
        for s in [
            "idle",
            "dirty:256:100",
            "dirty:64:max",
            "dirty:32:100:64",
            "dirty:0:max:1",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
        // FILL_MB 0 is the default and is left out.
        assert_eq!(parse("dirty:1:2:0").unwrap().to_string(), "dirty:1:2");
    }

    #[test]
    fn refuses_malformed_workloads_clearly() {
        assert_eq!(parse(""), Err(WorkloadError::Empty));
        assert_eq!(
            parse("spin:1"),
            Err(WorkloadError::UnknownKind("spin".into()))
        );
        assert_eq!(
            parse("Idle"),
            Err(WorkloadError::UnknownKind("Idle".into()))
        );
        assert_eq!(
            parse("idle:1"),
            Err(WorkloadError::IdleWithParameters("1".into()))
        );
        assert_eq!(parse("dirty"), Err(WorkloadError::MissingField("WS_MB")));
        assert_eq!(parse("dirty:64"), Err(WorkloadError::MissingField("RATE")));
        assert_eq!(parse("dirty:1:2:3:4"), Err(WorkloadError::TooManyFields(4)));
        assert_eq!(
            parse("dirty:abc:100"),
            Err(WorkloadError::NotANumber {
                field: "WS_MB",
                value: "abc".into()
            })
        );
        assert_eq!(
            parse("dirty::100"),
            Err(WorkloadError::NotANumber {
                field: "WS_MB",
                value: "".into()
            })
        );
        assert_eq!(
            parse("dirty:+5:100"),
            Err(WorkloadError::NotANumber {
                field: "WS_MB",
                value: "+5".into()
            })
        );
        assert_eq!(
            parse("dirty:5:fast"),
            Err(WorkloadError::NotANumber {
                field: "RATE",
                value: "fast".into()
            })
        );
        assert_eq!(parse("dirty:5:0"), Err(WorkloadError::ZeroRate));
        assert_eq!(
            parse("dirty:5:1:x"),
            Err(WorkloadError::NotANumber {
                field: "FILL_MB",
                value: "x".into()
            })
        );
        assert!(matches!(
            parse("dirty:99999999999999999999:1"),
            Err(WorkloadError::NotANumber { .. })
        ));
        assert_eq!(
            parse("dirty:16777216:1:1"),
            Err(WorkloadError::TooLarge(16_777_217))
        );
        assert!(parse("dirty:16777216:1").is_ok());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = parse("dirty:abc:100").unwrap_err().to_string();
        assert!(msg.contains("WS_MB") && msg.contains("abc"), "{msg}");
        let msg = parse("spin:1").unwrap_err().to_string();
        assert!(
            msg.contains("spin") && msg.contains("dirty:WS_MB:RATE"),
            "{msg}"
        );
        let msg = parse("dirty:1:2:3:4").unwrap_err().to_string();
        assert!(msg.contains("4 fields"), "{msg}");
    }

    #[test]
    fn bytes_needed_counts_working_set_and_fill() {
        assert_eq!(Workload::Idle.bytes_needed(), 0);
        assert_eq!(parse("dirty:256:100").unwrap().bytes_needed(), 256 << 20);
        assert_eq!(parse("dirty:32:max:64").unwrap().bytes_needed(), 96 << 20);
        let huge = Workload::Dirty {
            ws_mib: u64::MAX,
            rate: Rate::Max,
            fill_mib: 1,
        };
        assert_eq!(huge.bytes_needed(), u64::MAX);
    }
}
