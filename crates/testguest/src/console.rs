//! The one host-side parser of the guest's console lines
//! (`guest/README.md`, "Console lines").
//!
//! Every line is a tag followed by `key=value` fields separated by single
//! spaces; numbers are decimal unless prefixed `0x`. Unknown keys are
//! ignored (the guest may append fields), but a known line with a missing
//! or malformed documented field is returned as [`Line::Other`], never
//! half-filled. `cmdline=` (in `FERRY-GUEST`) and `reason=` (in `EXIT`)
//! take the rest of the line.

/// Exit codes the guest prints in `EXIT code=` and writes to
/// [`crate::EXIT_PORT`].
pub mod exit_code {
    pub const CLEAN: u64 = 0;
    /// The command line has a bad value (or too many vCPUs in `cpus=`).
    pub const BAD_CMDLINE: u64 = 1;
    /// The workload does not fit in the RAM of the memory map.
    pub const NO_FIT: u64 = 2;
    /// The guest panicked (a bug in the guest).
    pub const PANIC: u64 = 3;
    /// A vCPU index at or above `cpus=` (or 64) was started.
    pub const TOO_MANY_CPUS: u64 = 4;
    /// RSI/EBX does not point at a valid `hvm_start_info`.
    pub const BAD_START_INFO: u64 = 5;
    /// No `tsc_khz=` and no PIT to measure the TSC against.
    pub const NO_TSC_FREQ: u64 = 6;
    /// `net=` was given but no virtio-net device was found or it failed
    /// to initialise (the reason says which).
    pub const NO_NET: u64 = 7;
    /// `disk=` given but no usable virtio-blk device (missing, failed to
    /// initialise, too small or read-only).
    pub const NO_DISK: u64 = 8;
}

/// One console line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `FERRY-GUEST`: the first line after boot.
    Boot(Boot),
    /// `READY`: every vCPU has written its share.
    Ready(Ready),
    /// `HB`: the heartbeat, every 100 ms.
    Heartbeat(Heartbeat),
    /// `ERR`: a page failed verification.
    PageError(PageError),
    /// `EXIT`: the guest stops.
    Exit(Exit),
    /// Anything else, or a known tag with a missing or bad field (the line
    /// without its line ending).
    Other(String),
}

/// `FERRY-GUEST version=1 cpus=2 tsc_khz=2596000 cmdline=...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub version: u64,
    /// 0 if the command line could not be parsed (an EXIT follows).
    pub cpus: u64,
    /// The TSC frequency the guest uses; 0 if unknown (an EXIT follows).
    pub tsc_khz: u64,
    /// The command line as the guest read it (non-printable bytes as `?`).
    pub cmdline: String,
}

/// `READY ws_mb=256 rate=100 fill_mb=0 cpus=2 ws_base=0x600000 fill_base=0x10600000 init_ms=180`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub ws_mb: u64,
    /// MiB/s; `None` for `rate=max`. `Some(0)` for the idle workload.
    pub rate: Option<u64>,
    pub fill_mb: u64,
    pub cpus: u64,
    /// Guest-physical start of the working set.
    pub ws_base: u64,
    /// Guest-physical start of the fill region (right after the working set).
    pub fill_base: u64,
    /// Milliseconds from the start of the initial fill to READY.
    pub init_ms: u64,
}

/// `HB seq=12 t_ms=1234 wr=123456 ver=120000 err=0 sweeps=3 fsweeps=0 stall_us=41 rate_mibs=100`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Heartbeats since boot, from 0.
    pub seq: u64,
    /// Guest TSC time since boot.
    pub t_ms: u64,
    /// Pages written (working set and fill, all vCPUs).
    pub wr: u64,
    /// Pages verified (working set and fill, all vCPUs).
    pub ver: u64,
    /// Pages that failed verification.
    pub err: u64,
    /// Full verify-and-rewrite passes over the working set (minimum over vCPUs).
    pub sweeps: u64,
    /// Full verification passes over the fill region (minimum over vCPUs).
    pub fsweeps: u64,
    /// Longest gap the guest saw between two looks at its clock since the
    /// previous heartbeat (any vCPU): the blackout it really saw.
    pub stall_us: u64,
    /// MiB/s written since the previous heartbeat.
    pub rate_mibs: u64,
}

/// The network fields of an `HB` line, present when the guest runs with
/// `net=`: `... net_rx=120 net_tx=118 tcp_conns=1 tcp_replies=100 udp_echoes=10 net_err=0`.
///
/// They are parsed apart from [`Heartbeat`] (whose fields every existing
/// user fills in by name) with [`NetCounters::from_heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetCounters {
    /// Frames received from the virtio-net device.
    pub net_rx: u64,
    /// Frames handed to the device to send.
    pub net_tx: u64,
    /// TCP connections accepted on the echo port since boot.
    pub tcp_conns: u64,
    /// TCP echo replies sent (all connections).
    pub tcp_replies: u64,
    /// UDP datagrams echoed.
    pub udp_echoes: u64,
    /// Device errors, protocol violations (a line above 64 bytes resets
    /// its connection) and replies that could not be queued.
    pub net_err: u64,
}

impl NetCounters {
    /// The network counters of a heartbeat line: `None` if `line` is not
    /// a well-formed `HB` line with all six network fields (a guest
    /// without `net=` prints none of them).
    pub fn from_heartbeat(line: &str) -> Option<NetCounters> {
        let f = heartbeat_fields(line)?;
        Some(NetCounters {
            net_rx: f.num("net_rx")?,
            net_tx: f.num("net_tx")?,
            tcp_conns: f.num("tcp_conns")?,
            tcp_replies: f.num("tcp_replies")?,
            udp_echoes: f.num("udp_echoes")?,
            net_err: f.num("net_err")?,
        })
    }
}

/// The disk fields of an `HB` line, present when the guest runs with
/// `disk=`: `... disk_wr=326 disk_ver=40 disk_err=0 disk_inflight=1 disk_gen=2 disk_flushes=2`
/// (guest/README.md, "Disk"). Parsed apart from [`Heartbeat`] like
/// [`NetCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskCounters {
    /// Block writes the device acknowledged.
    pub disk_wr: u64,
    /// Blocks read back and checked against the last acknowledged write.
    pub disk_ver: u64,
    /// Blocks that failed the check (lost, stale, misplaced, corrupt) and
    /// requests that failed.
    pub disk_err: u64,
    /// Requests in flight (0 or 1).
    pub disk_inflight: u64,
    /// Highest generation written.
    pub disk_gen: u64,
    /// FLUSH requests completed.
    pub disk_flushes: u64,
}

impl DiskCounters {
    /// The disk counters of a heartbeat line: `None` if `line` is not a
    /// well-formed `HB` line with all six disk fields.
    pub fn from_heartbeat(line: &str) -> Option<DiskCounters> {
        let f = heartbeat_fields(line)?;
        Some(DiskCounters {
            disk_wr: f.num("disk_wr")?,
            disk_ver: f.num("disk_ver")?,
            disk_err: f.num("disk_err")?,
            disk_inflight: f.num("disk_inflight")?,
            disk_gen: f.num("disk_gen")?,
            disk_flushes: f.num("disk_flushes")?,
        })
    }
}

/// `DISK slot=23 addr=0xfeb02e00 version=1 capacity_sectors=65536 mb=16 rate=200 flush=1 scan_reads=48 scan_us=7170`:
/// printed once at boot when the disk is up. It parses as
/// [`Line::Other`]; [`DiskUp::parse`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUp {
    pub slot: u64,
    pub addr: u64,
    /// virtio-mmio version: 1 legacy, 2 modern.
    pub version: u64,
    /// The device's capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The MiB the workload goes round.
    pub mb: u64,
    /// Blocks per second, `None` for `max`.
    pub rate: Option<u64>,
    /// Whether the device offers FLUSH.
    pub flush: bool,
}

impl DiskUp {
    pub fn parse(line: &str) -> Option<DiskUp> {
        let f = tagged_fields(line, "DISK")?;
        Some(DiskUp {
            slot: f.num("slot")?,
            addr: f.num("addr")?,
            version: f.num("version")?,
            capacity_sectors: f.num("capacity_sectors")?,
            mb: f.num("mb")?,
            rate: match f.get("rate")? {
                "max" => None,
                r => Some(number(r)?),
            },
            flush: f.num("flush")? != 0,
        })
    }
}

/// The `key=value` fields of a line tagged `tag` (its ending trimmed).
fn tagged_fields<'a>(line: &'a str, tag: &str) -> Option<Fields<'a>> {
    let line = line.trim_end_matches(['\n', '\r']);
    let rest = line.strip_prefix(tag)?.strip_prefix(' ')?;
    Some(Fields(rest))
}

/// The fields of a well-formed `HB` line, for the counters a device's
/// workload appends to it.
fn heartbeat_fields(line: &str) -> Option<Fields<'_>> {
    if !matches!(
        parse_known(line.trim_end_matches(['\n', '\r']))?,
        Line::Heartbeat(_)
    ) {
        return None;
    }
    tagged_fields(line, "HB")
}

/// `NET slot=23 addr=0xfeb02e00 version=1 mac=52:54:00:12:34:56 ip=10.77.0.2/24 port=7000 scan_reads=48 scan_us=4306`:
/// printed once at boot when the network is up (before READY). It parses
/// as [`Line::Other`]; [`NetUp::parse`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetUp {
    /// virtio-mmio slot (0 to 23) and its guest-physical address.
    pub slot: u64,
    pub addr: u64,
    /// virtio-mmio version: 1 legacy, 2 modern.
    pub version: u64,
    /// The card's MAC, as printed (`xx:xx:xx:xx:xx:xx`).
    pub mac: String,
    /// `IP/PREFIX`, as printed.
    pub ip: String,
    pub port: u64,
    /// Register reads the slot scan made, and the time they took (each
    /// is a VM exit).
    pub scan_reads: u64,
    pub scan_us: u64,
}

impl NetUp {
    pub fn parse(line: &str) -> Option<NetUp> {
        let f = tagged_fields(line, "NET")?;
        Some(NetUp {
            slot: f.num("slot")?,
            addr: f.num("addr")?,
            version: f.num("version")?,
            mac: f.get("mac")?.to_owned(),
            ip: f.get("ip")?.to_owned(),
            port: f.num("port")?,
            scan_reads: f.num("scan_reads")?,
            scan_us: f.num("scan_us")?,
        })
    }
}

/// `ERR cpu=1 addr=0x8123000 gen=5`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageError {
    /// The vCPU that found it.
    pub cpu: u64,
    /// Guest-physical address of the page.
    pub addr: u64,
    /// The generation the page should have held.
    pub gen: u64,
}

/// `EXIT code=2 reason=...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// See [`exit_code`].
    pub code: u64,
    pub reason: String,
}

/// Parses one console line (with or without its line ending).
pub fn parse_line(line: &str) -> Line {
    let line = line.trim_end_matches(['\n', '\r']);
    parse_known(line).unwrap_or_else(|| Line::Other(line.to_owned()))
}

fn parse_known(line: &str) -> Option<Line> {
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    Some(match tag {
        "FERRY-GUEST" => {
            let (fields, cmdline) = split_tail(rest, "cmdline=")?;
            let f = Fields(fields);
            Line::Boot(Boot {
                version: f.num("version")?,
                cpus: f.num("cpus")?,
                tsc_khz: f.num("tsc_khz")?,
                cmdline: cmdline.to_owned(),
            })
        }
        "READY" => {
            let f = Fields(rest);
            Line::Ready(Ready {
                ws_mb: f.num("ws_mb")?,
                rate: match f.get("rate")? {
                    "max" => None,
                    r => Some(number(r)?),
                },
                fill_mb: f.num("fill_mb")?,
                cpus: f.num("cpus")?,
                ws_base: f.num("ws_base")?,
                fill_base: f.num("fill_base")?,
                init_ms: f.num("init_ms")?,
            })
        }
        "HB" => {
            let f = Fields(rest);
            Line::Heartbeat(Heartbeat {
                seq: f.num("seq")?,
                t_ms: f.num("t_ms")?,
                wr: f.num("wr")?,
                ver: f.num("ver")?,
                err: f.num("err")?,
                sweeps: f.num("sweeps")?,
                fsweeps: f.num("fsweeps")?,
                stall_us: f.num("stall_us")?,
                rate_mibs: f.num("rate_mibs")?,
            })
        }
        "ERR" => {
            let f = Fields(rest);
            Line::PageError(PageError {
                cpu: f.num("cpu")?,
                addr: f.num("addr")?,
                gen: f.num("gen")?,
            })
        }
        "EXIT" => {
            let (fields, reason) = split_tail(rest, "reason=")?;
            Line::Exit(Exit {
                code: Fields(fields).num("code")?,
                reason: reason.to_owned(),
            })
        }
        _ => return None,
    })
}

/// Splits `fields... key=tail` at the first field named `key`; the tail is
/// the rest of the line.
fn split_tail<'a>(rest: &'a str, key: &str) -> Option<(&'a str, &'a str)> {
    if let Some(tail) = rest.strip_prefix(key) {
        return Some(("", tail));
    }
    let at = rest.find(&format!(" {key}"))?;
    Some((&rest[..at], &rest[at + 1 + key.len()..]))
}

/// The `key=value` fields of a line (after its tag).
struct Fields<'a>(&'a str);

impl<'a> Fields<'a> {
    /// The value of the first field named `key`; tokens without `=` are
    /// ignored like unknown keys.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .split(' ')
            .filter_map(|t| t.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn num(&self, key: &str) -> Option<u64> {
        number(self.get(key)?)
    }
}

/// Decimal, or hexadecimal with `0x`.
fn number(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_examples() {
        assert_eq!(
            parse_line("FERRY-GUEST version=1 cpus=2 tsc_khz=2596000 cmdline=workload=dirty:256:100 cpus=2\n"),
            Line::Boot(Boot {
                version: 1,
                cpus: 2,
                tsc_khz: 2_596_000,
                cmdline: "workload=dirty:256:100 cpus=2".into()
            })
        );
        assert_eq!(
            parse_line("READY ws_mb=256 rate=100 fill_mb=0 cpus=2 ws_base=0x400000 fill_base=0x10400000 init_ms=180"),
            Line::Ready(Ready {
                ws_mb: 256,
                rate: Some(100),
                fill_mb: 0,
                cpus: 2,
                ws_base: 0x40_0000,
                fill_base: 0x1040_0000,
                init_ms: 180
            })
        );
        assert_eq!(
            parse_line("HB seq=12 t_ms=1234 wr=123456 ver=120000 err=0 sweeps=3 fsweeps=0 stall_us=41 rate_mibs=100\r\n"),
            Line::Heartbeat(Heartbeat {
                seq: 12,
                t_ms: 1234,
                wr: 123_456,
                ver: 120_000,
                err: 0,
                sweeps: 3,
                fsweeps: 0,
                stall_us: 41,
                rate_mibs: 100
            })
        );
        assert_eq!(
            parse_line("ERR cpu=1 addr=0x8123000 gen=5"),
            Line::PageError(PageError {
                cpu: 1,
                addr: 0x812_3000,
                gen: 5
            })
        );
        assert_eq!(
            parse_line(
                "EXIT code=2 reason=workload does not fit in RAM: it needs 0x600000..0x40600000"
            ),
            Line::Exit(Exit {
                code: 2,
                reason: "workload does not fit in RAM: it needs 0x600000..0x40600000".into()
            })
        );
    }

    #[test]
    fn rate_max_and_empty_tails() {
        let Line::Ready(r) = parse_line("READY ws_mb=64 rate=max fill_mb=0 cpus=1 ws_base=0x600000 fill_base=0x4600000 init_ms=3")
        else {
            panic!("not READY")
        };
        assert_eq!(r.rate, None);
        let Line::Boot(b) = parse_line("FERRY-GUEST version=1 cpus=0 tsc_khz=0 cmdline=") else {
            panic!("not a boot line")
        };
        assert_eq!(b.cmdline, "");
        let Line::Exit(e) = parse_line("EXIT code=0 reason=") else {
            panic!("not EXIT")
        };
        assert_eq!((e.code, e.reason.as_str()), (0, ""));
    }

    #[test]
    fn the_rest_of_the_line_may_contain_anything() {
        let Line::Boot(b) =
            parse_line("FERRY-GUEST version=1 cpus=1 tsc_khz=5 cmdline=a=b  cmdline=x version=9")
        else {
            panic!("not a boot line")
        };
        assert_eq!(
            (b.version, b.cmdline.as_str()),
            (1, "a=b  cmdline=x version=9")
        );
        let Line::Exit(e) = parse_line("EXIT code=3 reason=panic at src/x.rs:1:2: code=7 reason=x")
        else {
            panic!("not EXIT")
        };
        assert_eq!(
            (e.code, e.reason.as_str()),
            (3, "panic at src/x.rs:1:2: code=7 reason=x")
        );
    }

    #[test]
    fn ignores_unknown_keys_in_any_order() {
        let line = "HB extra=1 rate_mibs=5 seq=1 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9 junk new=0x10";
        let Line::Heartbeat(hb) = parse_line(line) else {
            panic!("not HB")
        };
        assert_eq!((hb.seq, hb.rate_mibs, hb.stall_us), (1, 5, 9));
        let Line::PageError(e) = parse_line("ERR cpu=0 addr=0x1000 gen=0 kind=fill") else {
            panic!("not ERR")
        };
        assert_eq!(e.addr, 0x1000);
        let Line::Boot(b) = parse_line("FERRY-GUEST version=2 cpus=1 tsc_khz=1 arch=x86 cmdline=")
        else {
            panic!()
        };
        assert_eq!(b.version, 2);
    }

    #[test]
    fn malformed_known_lines_are_other() {
        for line in [
            "HB seq=1 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9",
            "HB seq=1 t_ms=2 wr=3 ver=x err=0 sweeps=0 fsweeps=0 stall_us=9 rate_mibs=1",
            "HB seq=-1 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9 rate_mibs=1",
            "HB seq=99999999999999999999 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9 rate_mibs=1",
            "READY ws_mb=1 rate=fast fill_mb=0 cpus=1 ws_base=0x0 fill_base=0x0 init_ms=1",
            "READY ws_mb=1 rate=1 fill_mb=0 cpus=1 ws_base=0x fill_base=0x0 init_ms=1",
            "ERR cpu=1 addr=8123000x gen=5",
            "EXIT code=2",
            "EXIT reason=no code",
            "FERRY-GUEST version=1 cpus=1 tsc_khz=1",
            "HB",
            "",
            "hb seq=1",
            "Booting from ROM...",
        ] {
            assert_eq!(parse_line(line), Line::Other(line.into()), "{line:?}");
        }
    }

    #[test]
    fn heartbeat_network_fields_are_optional() {
        let plain = "HB seq=1 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9 rate_mibs=1";
        assert_eq!(NetCounters::from_heartbeat(plain), None);
        let net = format!(
            "{plain} net_rx=120 net_tx=118 tcp_conns=1 tcp_replies=100 udp_echoes=10 net_err=0\n"
        );
        // The heartbeat itself parses as before, whatever follows it.
        let Line::Heartbeat(hb) = parse_line(&net) else {
            panic!("not HB")
        };
        assert_eq!((hb.seq, hb.rate_mibs), (1, 1));
        assert_eq!(
            NetCounters::from_heartbeat(&net),
            Some(NetCounters {
                net_rx: 120,
                net_tx: 118,
                tcp_conns: 1,
                tcp_replies: 100,
                udp_echoes: 10,
                net_err: 0
            })
        );
        // One field missing or malformed: no counters (the HB still parses).
        for bad in [
            format!("{plain} net_rx=1 net_tx=1 tcp_conns=1 tcp_replies=1 udp_echoes=1"),
            format!("{plain} net_rx=1 net_tx=x tcp_conns=1 tcp_replies=1 udp_echoes=1 net_err=0"),
        ] {
            assert_eq!(NetCounters::from_heartbeat(&bad), None, "{bad}");
            assert!(matches!(parse_line(&bad), Line::Heartbeat(_)));
        }
        // A malformed HB has no counters either.
        assert_eq!(
            NetCounters::from_heartbeat(
                "HB seq=1 net_rx=1 net_tx=1 tcp_conns=1 tcp_replies=1 udp_echoes=1 net_err=0"
            ),
            None
        );
    }

    #[test]
    fn heartbeat_disk_fields_are_optional() {
        let plain = "HB seq=1 t_ms=2 wr=3 ver=4 err=0 sweeps=0 fsweeps=0 stall_us=9 rate_mibs=1";
        assert_eq!(DiskCounters::from_heartbeat(plain), None);
        let disk = format!(
            "{plain} net_rx=1 net_tx=1 tcp_conns=0 tcp_replies=0 udp_echoes=0 net_err=0 disk_wr=326 disk_ver=40 disk_err=0 disk_inflight=1 disk_gen=2 disk_flushes=3\n"
        );
        assert_eq!(
            DiskCounters::from_heartbeat(&disk),
            Some(DiskCounters {
                disk_wr: 326,
                disk_ver: 40,
                disk_err: 0,
                disk_inflight: 1,
                disk_gen: 2,
                disk_flushes: 3
            })
        );
        assert!(NetCounters::from_heartbeat(&disk).is_some());
        let bad = format!(
            "{plain} disk_wr=1 disk_ver=1 disk_err=x disk_inflight=0 disk_gen=1 disk_flushes=0"
        );
        assert_eq!(DiskCounters::from_heartbeat(&bad), None);
        assert!(matches!(parse_line(&bad), Line::Heartbeat(_)));
        // Not an HB line at all.
        assert_eq!(
            DiskCounters::from_heartbeat(
                "HBX disk_wr=1 disk_ver=1 disk_err=0 disk_inflight=0 disk_gen=1 disk_flushes=0"
            ),
            None
        );
    }

    #[test]
    fn parses_the_disk_line() {
        let line = "DISK slot=23 addr=0xfeb02e00 version=1 capacity_sectors=65536 mb=16 rate=200 flush=1 scan_reads=48 scan_us=7170\n";
        assert_eq!(parse_line(line), Line::Other(line.trim_end().into()));
        assert_eq!(
            DiskUp::parse(line),
            Some(DiskUp {
                slot: 23,
                addr: 0xfeb0_2e00,
                version: 1,
                capacity_sectors: 65536,
                mb: 16,
                rate: Some(200),
                flush: true
            })
        );
        let max = "DISK slot=1 addr=0xfeb00200 version=2 capacity_sectors=8 mb=1 rate=max flush=0";
        assert_eq!(
            DiskUp::parse(max).map(|d| (d.rate, d.flush)),
            Some((None, false))
        );
        assert_eq!(DiskUp::parse("DISK slot=1"), None);
        assert_eq!(DiskUp::parse("NET slot=1"), None);
    }

    #[test]
    fn parses_the_net_line() {
        let line = "NET slot=23 addr=0xfeb02e00 version=1 mac=52:54:00:12:34:56 ip=10.77.0.2/24 port=7000 scan_reads=48 scan_us=4306\n";
        assert!(matches!(parse_line(line), Line::Other(_)));
        assert_eq!(
            NetUp::parse(line),
            Some(NetUp {
                slot: 23,
                addr: 0xfeb0_2e00,
                version: 1,
                mac: "52:54:00:12:34:56".into(),
                ip: "10.77.0.2/24".into(),
                port: 7000,
                scan_reads: 48,
                scan_us: 4306
            })
        );
        assert_eq!(NetUp::parse("NET slot=1"), None);
        assert_eq!(NetUp::parse("HB seq=1"), None);
    }

    #[test]
    fn other_keeps_the_line_without_its_ending() {
        assert_eq!(
            parse_line("SeaBIOS (version 1.16)\r\n"),
            Line::Other("SeaBIOS (version 1.16)".into())
        );
    }
}
