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

/// `net=IP/PREFIX:PORT`: the guest's address on its virtio-net device and
/// the port its TCP and UDP echo serve.
#[derive(Clone, Copy)]
pub struct NetConfig {
    pub ip: [u8; 4],
    pub prefix: u8,
    pub port: u16,
}

/// How fast the disk workload goes through its blocks.
#[derive(Clone, Copy)]
pub enum DiskRate {
    /// 4 KiB blocks written per second (each rewrite also reads the block
    /// back first).
    BlocksPerSec(u64),
    Max,
}

/// `disk=MB:RATE`: the disk workload over the first MB MiB of the
/// virtio-blk device.
#[derive(Clone, Copy)]
pub struct DiskConfig {
    pub mib: u64,
    pub rate: DiskRate,
}

/// Largest `disk=` MB: the table of acknowledged generations (4 bytes per
/// 4 KiB block) lives in .bss and is sized for it.
pub const DISK_MAX_MIB: u64 = 256;

/// What the command line asks for.
pub struct Options {
    pub workload: Workload,
    pub cpus: u32,
    pub tsc_khz: Option<u64>,
    pub net: Option<NetConfig>,
    pub disk: Option<DiskConfig>,
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
    let mut net = None;
    let mut disk = None;
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
            b"net" => {
                let parsed = parse_net(value).map_err(err)?;
                if net.replace(parsed).is_some() {
                    return Err(err("net= given twice"));
                }
            }
            b"disk" => {
                let parsed = parse_disk(value).map_err(err)?;
                if disk.replace(parsed).is_some() {
                    return Err(err("disk= given twice"));
                }
            }
            _ => {}
        }
    }
    Ok(Options {
        workload: workload.unwrap_or(Workload::Idle),
        cpus: cpus.unwrap_or(1),
        tsc_khz,
        net,
        disk,
    })
}

/// `MB:RATE`: MB from 1 to [`DISK_MAX_MIB`], RATE blocks per second (above
/// 0) or `max`.
fn parse_disk(value: &[u8]) -> Result<DiskConfig, &'static str> {
    const SYNTAX: &str = "disk= is not MB:RATE (e.g. disk=16:200, RATE in 4 KiB blocks/s or max)";
    let colon = value.iter().position(|&b| b == b':').ok_or(SYNTAX)?;
    let (mib, rate) = (&value[..colon], &value[colon + 1..]);
    let mib = number(mib).ok_or(SYNTAX)?;
    if mib == 0 || mib > DISK_MAX_MIB {
        return Err("disk= MB must be 1 to 256");
    }
    let rate = if rate == b"max" {
        DiskRate::Max
    } else {
        match number(rate).ok_or(SYNTAX)? {
            0 => return Err("disk= RATE must be above 0 (or max)"),
            r => DiskRate::BlocksPerSec(r),
        }
    };
    Ok(DiskConfig { mib, rate })
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

/// `IP/PREFIX:PORT`: a dotted-quad unicast IPv4 address, a prefix length
/// of 1 to 32 and a port of 1 to 65535.
fn parse_net(value: &[u8]) -> Result<NetConfig, &'static str> {
    const SYNTAX: &str = "net= is not IP/PREFIX:PORT (e.g. net=10.77.0.2/24:7000)";
    let slash = value.iter().position(|&b| b == b'/').ok_or(SYNTAX)?;
    let colon = value.iter().position(|&b| b == b':').ok_or(SYNTAX)?;
    if colon < slash {
        return Err(SYNTAX);
    }
    let (ip, prefix, port) = (
        &value[..slash],
        &value[slash + 1..colon],
        &value[colon + 1..],
    );
    let mut octets = [0u8; 4];
    let mut parts = ip.split(|&b| b == b'.');
    for octet in &mut octets {
        let part = parts.next().ok_or("net= IP is not a dotted quad a.b.c.d")?;
        // At most three digits and no leading zero: no "010" passing
        // for 10 (or for octal 8).
        if part.len() > 3 || (part.len() > 1 && part[0] == b'0') {
            return Err("net= IP is not a dotted quad a.b.c.d");
        }
        *octet = number(part)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or("net= IP is not a dotted quad a.b.c.d")?;
    }
    if parts.next().is_some() {
        return Err("net= IP is not a dotted quad a.b.c.d");
    }
    if octets[0] == 0 || octets[0] == 127 || octets[0] >= 224 {
        return Err("net= IP must be a unicast address (not 0.x, 127.x, multicast or above)");
    }
    let prefix = number(prefix)
        .filter(|p| (1..=32).contains(p))
        .ok_or("net= PREFIX must be 1 to 32")?;
    let port = number(port)
        .filter(|p| (1..=65535).contains(p))
        .ok_or("net= PORT must be 1 to 65535")?;
    Ok(NetConfig {
        ip: octets,
        prefix: prefix as u8,
        port: port as u16,
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
