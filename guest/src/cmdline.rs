//! The command line: space-separated `key=value` tokens (README, "Command
//! line"). Unknown keys and bare words are ignored, so a VMM or QEMU may add
//! its own; a known key with a bad value is an error, never a guess.
//! `ferry_testguest::workload` is the host-side twin of the workload syntax.

use crate::MAX_CPUS;

/// How fast a dirty workload rewrites its working set.
#[derive(Clone, Copy)]
pub enum Rate {
    MibPerSec(u64),
    Max,
}

#[derive(Clone, Copy)]
pub enum Workload {
    Idle,
    Dirty {
        ws_mib: u64,
        rate: Rate,
        fill_mib: u64,
    },
}

/// What the command line asks for.
pub struct Options {
    pub workload: Workload,
    pub cpus: u32,
    pub tsc_khz: Option<u64>,
}

/// What is wrong, and the token it is wrong in.
pub struct Error<'a> {
    pub what: &'static str,
    pub token: &'a [u8],
}

pub fn parse(cmdline: &[u8]) -> Result<Options, Error<'_>> {
    let mut workload = None;
    let mut cpus = None;
    let mut tsc_khz = None;
    for token in cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        let err = |what| Error { what, token };
        match key {
            b"workload" => {
                let parsed = parse_workload(value).map_err(err)?;
                if workload.replace(parsed).is_some() {
                    return Err(err("workload= given twice"));
                }
            }
            b"cpus" => {
                let n = number(value).ok_or_else(|| err("cpus= is not a decimal number"))?;
                if n == 0 {
                    return Err(err("cpus= must be at least 1"));
                }
                if n > MAX_CPUS as u64 {
                    return Err(err("cpus= is above the 64 vCPUs this guest supports"));
                }
                if cpus.replace(n as u32).is_some() {
                    return Err(err("cpus= given twice"));
                }
            }
            b"tsc_khz" => {
                let n = number(value).ok_or_else(|| err("tsc_khz= is not a decimal number"))?;
                if n == 0 {
                    return Err(err("tsc_khz= must be above 0"));
                }
                if tsc_khz.replace(n).is_some() {
                    return Err(err("tsc_khz= given twice"));
                }
            }
            _ => {}
        }
    }
    Ok(Options {
        workload: workload.unwrap_or(Workload::Idle),
        cpus: cpus.unwrap_or(1),
        tsc_khz,
    })
}

/// `idle` or `dirty:WS_MB:RATE[:FILL_MB]`.
fn parse_workload(value: &[u8]) -> Result<Workload, &'static str> {
    if value == b"idle" {
        return Ok(Workload::Idle);
    }
    let Some(rest) = value.strip_prefix(b"dirty:") else {
        return Err("unknown workload (want idle or dirty:WS_MB:RATE[:FILL_MB])");
    };
    let mut fields = rest.split(|&b| b == b':');
    let ws = fields.next().unwrap_or_default();
    let rate = fields
        .next()
        .ok_or("dirty workload without RATE (want dirty:WS_MB:RATE[:FILL_MB])")?;
    let fill = fields.next();
    if fields.next().is_some() {
        return Err("too many fields in dirty workload (want dirty:WS_MB:RATE[:FILL_MB])");
    }
    let ws_mib = number(ws).ok_or("WS_MB is not a decimal number")?;
    let rate = if rate == b"max" {
        Rate::Max
    } else {
        match number(rate).ok_or("RATE is not a decimal number or max")? {
            0 => return Err("RATE must be above 0 (or max)"),
            r => Rate::MibPerSec(r),
        }
    };
    let fill_mib = match fill {
        Some(f) => number(f).ok_or("FILL_MB is not a decimal number")?,
        None => 0,
    };
    // Sizes must stay representable in bytes (and in 4 KiB page indexes
    // shifted by 32 for page_value: 16 TiB).
    const LIMIT_MIB: u64 = 16 << 20;
    if ws_mib
        .checked_add(fill_mib)
        .is_none_or(|total| total > LIMIT_MIB)
    {
        return Err("WS_MB + FILL_MB is above 16 TiB");
    }
    Ok(Workload::Dirty {
        ws_mib,
        rate,
        fill_mib,
    })
}

/// A decimal number: digits only, no sign, no overflow.
fn number(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}
