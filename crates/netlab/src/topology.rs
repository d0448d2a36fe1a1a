//! The test topology as a value: `Topology::up` builds it with
//! scripts/net-topology.sh (embedded in this crate, so a binary needs no
//! checkout), knows every name the script made, and tears it down when
//! dropped, also while a test panics.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::command::{find_program, run, run_shown};
use crate::{MacAddr, NetlabError};

/// The topology script, compiled in: the tests, the demo and the bench
/// build the same topology as a person running the script by hand.
const SCRIPT: &str = include_str!("../../../scripts/net-topology.sh");

/// Prefixes the script accepts (it checks again).
const MAX_PREFIX_LEN: usize = 24;

/// One of the two simulated hosts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
pub enum Host {
    A,
    B,
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Host::A => "A",
            Host::B => "B",
        })
    }
}

/// The names of one built topology, as the script printed them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopologyNames {
    pub prefix: String,
    /// The short form of the prefix at the start of every interface name.
    pub tag: String,
    pub subnet_index: u8,
    /// `10.77.N.0/24`
    pub subnet: String,
    pub prefix_len: u8,
    /// Where the guest (or the stand-in) answers: `10.77.N.2`.
    pub guest_ip: Ipv4Addr,
    /// The client's address: `10.77.N.100`.
    pub client_ip: Ipv4Addr,
    pub switch: SwitchNames,
    pub host_a: HostNames,
    pub host_b: HostNames,
    pub client: ClientNames,
    pub standin: StandInNames,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwitchNames {
    pub ns: String,
    pub bridge: String,
    /// The switch's end of host A's uplink.
    pub port_a: String,
    pub port_b: String,
    pub port_client: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostNames {
    pub ns: String,
    pub bridge: String,
    /// The host's end of its uplink to the switch.
    pub uplink: String,
    /// The persistent tap a VMM opens with `--net tap=TAP,netns=NS`.
    pub tap: String,
    /// The host's own address on its bridge (`10.77.N.11` for A, `.12`
    /// for B): where its agent and VMMs listen.
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientNames {
    pub ns: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

/// Where netlab's stand-in echo server lives (made by `StandIn`, removed
/// by the script's `down` as well).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StandInNames {
    pub ns: String,
    /// Its veth end on a host's bridge (moves between the hosts).
    pub port: String,
}

impl TopologyNames {
    pub fn host(&self, host: Host) -> &HostNames {
        match host {
            Host::A => &self.host_a,
            Host::B => &self.host_b,
        }
    }

    /// The switch port that leads to `host`.
    pub fn switch_port(&self, host: Host) -> &str {
        match host {
            Host::A => &self.switch.port_a,
            Host::B => &self.switch.port_b,
        }
    }

    /// Every namespace of the topology (the stand-in's included).
    pub fn namespaces(&self) -> [&str; 5] {
        [
            &self.switch.ns,
            &self.host_a.ns,
            &self.host_b.ns,
            &self.client.ns,
            &self.standin.ns,
        ]
    }
}

/// Where the switch bridge has learnt a MAC.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub enum FdbPlace {
    /// Behind host A's uplink.
    HostA,
    HostB,
    Client,
    /// Another port (none exists in this topology, but say so if seen).
    Other(String),
}

/// A built topology; dropping it runs the script's `down`.
#[derive(Debug)]
pub struct Topology {
    names: TopologyNames,
    torn_down: bool,
}

/// The script's document: the names and the state.
#[derive(Deserialize)]
struct ScriptOutput {
    state: String,
    #[serde(default)]
    missing: Vec<String>,
    #[serde(flatten)]
    names: TopologyNames,
}

/// What exists of a prefix's topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TopologyState {
    Up,
    Down,
    /// Some pieces exist; `missing` names the others (`ns` or `ns/ifname`).
    Partial {
        missing: Vec<String>,
    },
}

impl Topology {
    /// Why the topology cannot be built on this machine, or None when it
    /// can: tests print this and skip.
    pub fn skip_reason() -> Option<String> {
        if !rustix::process::geteuid().is_root() {
            return Some("the network topology needs root (namespaces, bridges, taps)".into());
        }
        for tool in ["ip", "bridge", "bash"] {
            if find_program(tool).is_none() {
                return Some(format!(
                    "'{tool}' is not installed (Debian package iproute2 / bash)"
                ));
            }
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some("/dev/net/tun is missing (no tun/tap support)".into());
        }
        None
    }

    /// Builds the topology for `prefix` with the subnet the script derives
    /// from the prefix. A half-made topology of the same prefix is removed
    /// and built anew.
    pub fn up(prefix: &str) -> Result<Topology, NetlabError> {
        Self::build(prefix, None)
    }

    /// Builds the topology on subnet 10.77.`subnet_index`.0/24.
    pub fn up_on_subnet(prefix: &str, subnet_index: u16) -> Result<Topology, NetlabError> {
        if subnet_index > 254 {
            return Err(NetlabError::BadSubnetIndex(subnet_index));
        }
        Self::build(prefix, Some(subnet_index as u8))
    }

    fn build(prefix: &str, subnet_index: Option<u8>) -> Result<Topology, NetlabError> {
        check_prefix(prefix)?;
        if let Some(reason) = Self::skip_reason() {
            return Err(NetlabError::Unsupported(reason));
        }
        let index = subnet_index.map(|i| i.to_string());
        let mut args = vec!["up", prefix];
        if let Some(index) = &index {
            args.push(index);
        }
        let out = run_script(&args)?;
        let parsed = parse_output(&out, &args);
        let names = match parsed {
            Ok(o) if o.state == "up" => o.names,
            Ok(o) => {
                let _ = run_script(&["down", prefix]);
                return Err(NetlabError::BadOutput {
                    command: script_shown(&args),
                    reason: format!("state is {:?} after up", o.state),
                    output: out,
                });
            }
            Err(e) => {
                let _ = run_script(&["down", prefix]);
                return Err(e);
            }
        };
        Ok(Topology {
            names,
            torn_down: false,
        })
    }

    pub fn names(&self) -> &TopologyNames {
        &self.names
    }

    pub fn prefix(&self) -> &str {
        &self.names.prefix
    }

    pub fn guest_ip(&self) -> Ipv4Addr {
        self.names.guest_ip
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.names.client_ip
    }

    pub fn client_ns(&self) -> &str {
        &self.names.client.ns
    }

    pub fn host(&self, host: Host) -> &HostNames {
        self.names.host(host)
    }

    /// The switch port on which the switch bridge has learnt `mac`, from
    /// `bridge fdb show` in the switch's namespace; None when it has not
    /// learnt it (or the entry aged out).
    pub fn fdb_port(&self, mac: MacAddr) -> Result<Option<String>, NetlabError> {
        let sw = &self.names.switch;
        let out = run(
            "bridge",
            &["-n", &sw.ns, "-j", "fdb", "show", "br", &sw.bridge],
        )?;
        parse_fdb(&out, &sw.bridge, mac).map_err(|reason| NetlabError::BadOutput {
            command: format!("bridge -n {} -j fdb show br {}", sw.ns, sw.bridge),
            reason,
            output: out.chars().take(400).collect(),
        })
    }

    /// Which side of the switch has `mac`, by `fdb_port`.
    pub fn fdb_place(&self, mac: MacAddr) -> Result<Option<FdbPlace>, NetlabError> {
        let sw = &self.names.switch;
        Ok(self.fdb_port(mac)?.map(|port| {
            if port == sw.port_a {
                FdbPlace::HostA
            } else if port == sw.port_b {
                FdbPlace::HostB
            } else if port == sw.port_client {
                FdbPlace::Client
            } else {
                FdbPlace::Other(port)
            }
        }))
    }

    /// Removes the topology now, reporting a failure (Drop only prints it).
    pub fn down(mut self) -> Result<(), NetlabError> {
        self.torn_down = true;
        run_script(&["down", &self.names.prefix]).map(|_| ())
    }

    /// What exists of `prefix`'s topology, by the script's `status`.
    pub fn status(prefix: &str) -> Result<TopologyState, NetlabError> {
        check_prefix(prefix)?;
        let args = ["status", prefix];
        let out = run_script(&args)?;
        let parsed = parse_output(&out, &args)?;
        match parsed.state.as_str() {
            "up" => Ok(TopologyState::Up),
            "down" => Ok(TopologyState::Down),
            "partial" => Ok(TopologyState::Partial {
                missing: parsed.missing,
            }),
            other => Err(NetlabError::BadOutput {
                command: script_shown(&args),
                reason: format!("unknown state {other:?}"),
                output: out,
            }),
        }
    }

    /// Runs the script's `down` for `prefix`, whether or not this process
    /// built it: for cleaning up after a process that was killed.
    pub fn down_prefix(prefix: &str) -> Result<(), NetlabError> {
        check_prefix(prefix)?;
        run_script(&["down", prefix]).map(|_| ())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if let Err(e) = run_script(&["down", &self.names.prefix]) {
            eprintln!(
                "netlab: could not remove topology {}: {e}",
                self.names.prefix
            );
        }
    }
}

fn check_prefix(prefix: &str) -> Result<(), NetlabError> {
    let bad = |reason| {
        Err(NetlabError::BadPrefix {
            prefix: prefix.to_string(),
            reason,
        })
    };
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
        return bad("use 1-24 characters");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("use lower-case letters, digits and '-'");
    }
    if prefix.starts_with('-') {
        return bad("start with a letter or digit");
    }
    Ok(())
}

fn script_shown(args: &[&str]) -> String {
    format!("net-topology.sh {}", args.join(" "))
}

fn run_script(args: &[&str]) -> Result<String, NetlabError> {
    let mut full = vec!["-c", SCRIPT, "net-topology.sh"];
    full.extend_from_slice(args);
    full.push("--json");
    let mut shown = args.to_vec();
    shown.push("--json");
    run_shown("bash", &full, &script_shown(&shown))
}

fn parse_output(out: &str, args: &[&str]) -> Result<ScriptOutput, NetlabError> {
    serde_json::from_str(out).map_err(|e| NetlabError::BadOutput {
        command: script_shown(args),
        reason: e.to_string(),
        output: out.to_string(),
    })
}

/// One entry of `bridge -j fdb show`.
#[derive(Deserialize)]
struct FdbEntry {
    mac: String,
    ifname: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    state: String,
}

/// The port of `bridge` that learnt `mac`; the bridge's own (permanent)
/// entries and entries of the ports themselves ("self") are not learnt.
fn parse_fdb(json: &str, bridge: &str, mac: MacAddr) -> Result<Option<String>, String> {
    let entries: Vec<FdbEntry> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mac = mac.to_string();
    Ok(entries
        .into_iter()
        .find(|e| {
            e.mac.eq_ignore_ascii_case(&mac)
                && e.master.as_deref() == Some(bridge)
                && e.state != "permanent"
        })
        .map(|e| e.ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_the_script_refuses_are_refused_first() {
        for bad in [
            "",
            "Upper",
            "a/b",
            "-lead",
            "a b",
            "abcdefghijklmnopqrstuvwxy",
        ] {
            let err = Topology::up(bad).unwrap_err();
            assert!(matches!(err, NetlabError::BadPrefix { .. }), "{bad}: {err}");
        }
        assert!(check_prefix("netlab-12345-1").is_ok());
    }

    #[test]
    fn a_subnet_index_past_254_is_refused() {
        assert!(matches!(
            Topology::up_on_subnet("ok", 255),
            Err(NetlabError::BadSubnetIndex(255))
        ));
    }

    #[test]
    fn fdb_finds_the_learnt_port_and_ignores_permanent_and_self_entries() {
        let json = r#"[{"mac":"33:33:00:00:00:01","ifname":"t-sw","flags":["self"],"state":"permanent"},
            {"mac":"02:6e:6c:00:07:02","ifname":"t-pa","flags":["self"],"state":"permanent"},
            {"mac":"6e:66:21:0d:2a:5d","ifname":"t-pa","flags":[],"master":"t-sw","state":"permanent"},
            {"mac":"02:6E:6C:00:07:02","ifname":"t-pb","flags":[],"master":"t-sw","state":""}]"#;
        let mac: MacAddr = "02:6e:6c:00:07:02".parse().unwrap();
        assert_eq!(
            parse_fdb(json, "t-sw", mac).unwrap().as_deref(),
            Some("t-pb")
        );
        let own: MacAddr = "6e:66:21:0d:2a:5d".parse().unwrap();
        assert_eq!(parse_fdb(json, "t-sw", own).unwrap(), None);
        assert!(parse_fdb("not json", "t-sw", mac).is_err());
    }

    #[test]
    fn the_script_document_parses_into_names() {
        let doc = r#"{"state":"up","missing":[],"prefix":"nltest","tag":"nltest","subnet_index":7,"subnet":"10.77.7.0/24","prefix_len":24,"guest_ip":"10.77.7.2","client_ip":"10.77.7.100",
 "switch":{"ns":"nltest-switch","bridge":"nltest-sw","port_a":"nltest-pa","port_b":"nltest-pb","port_client":"nltest-pc"},
 "host_a":{"ns":"nltest-hostA","bridge":"nltest-bra","uplink":"nltest-ua","tap":"nltest-ta","ip":"10.77.7.11"},
 "host_b":{"ns":"nltest-hostB","bridge":"nltest-brb","uplink":"nltest-ub","tap":"nltest-tb","ip":"10.77.7.12"},
 "client":{"ns":"nltest-client","ifname":"nltest-c","ip":"10.77.7.100"},
 "standin":{"ns":"nltest-vm","port":"nltest-vm"}}"#;
        let out = parse_output(doc, &["up"]).unwrap();
        assert_eq!(out.state, "up");
        assert_eq!(out.names.guest_ip, Ipv4Addr::new(10, 77, 7, 2));
        assert_eq!(out.names.switch_port(Host::B), "nltest-pb");
        assert_eq!(out.names.host(Host::A).tap, "nltest-ta");
        assert_eq!(out.names.host(Host::B).ip, Ipv4Addr::new(10, 77, 7, 12));
    }
}
