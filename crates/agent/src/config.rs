//! `host.toml`: who this host is, where it listens, what it may give to
//! VMs, and where it keeps its state. Unknown keys are an error, so a typo
//! never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the agent's Unix socket is unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ferry/ferryd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config {} is not valid: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("the config {}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("cannot find the ferry binary next to ferryd ({0}); set ferry_bin in the config")]
    NoFerryBin(String),
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host_name: String,
    /// host:port of the peer (mTLS) listener; served when `tls_dir` is
    /// set too.
    peer_listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    /// This host's identity directory (`ferry ca issue`): the CA
    /// certificate, this host's certificate and key.
    tls_dir: Option<PathBuf>,
    /// Let migrations to and from this host carry guest memory in the
    /// clear (the data plane has no TLS in this build). Both agents must
    /// say so; otherwise an agent migration is refused.
    #[serde(default)]
    insecure_plaintext_data_plane: bool,
    state_dir: PathBuf,
    ferry_bin: Option<PathBuf>,
    capacity: RawCapacity,
    /// The networks this host offers VMs: `[[network]]` tables.
    #[serde(default, rename = "network")]
    networks: Vec<Network>,
    /// The fleet this host registers with: a `[fleet]` table.
    #[serde(default)]
    fleet: Option<crate::fleet_member::FleetMembership>,
    /// How many ended migrations stay on file, and for how long: a
    /// `[retention]` table (default keep = 200, max_age_hours = 168).
    #[serde(default)]
    retention: crate::retention::Retention,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    /// With a unit: "8G", "512M".
    memory: String,
    vcpus: u32,
}

/// What VMs on this host may take in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub mem_bytes: u64,
    pub vcpus: u32,
}

/// A network VMs of this host may join: a bridge (in the host's own
/// network namespace, or in `netns`) that the agent attaches each VM's
/// tap to, as libvirt's `<interface type='bridge'>` does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// What VM definitions call it (`net = { network = "prod" }`); the
    /// same name on every host the VM may move to.
    pub name: String,
    /// The bridge's interface name.
    pub bridge: String,
    /// The network namespace (under /run/netns) the bridge lives in;
    /// none: the agent's own.
    #[serde(default)]
    pub netns: Option<String>,
}

/// True for an interface name the kernel takes: 1 to 15 bytes, no '/',
/// no whitespace, not . or ..
pub fn is_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// True for a namespace name under /run/netns.
pub fn is_netns_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control())
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host_name: String,
    pub peer_listen: Option<SocketAddr>,
    pub socket: PathBuf,
    pub tls_dir: Option<PathBuf>,
    pub insecure_plaintext_data_plane: bool,
    pub state_dir: PathBuf,
    pub ferry_bin: PathBuf,
    pub capacity: Capacity,
    pub networks: Vec<Network>,
    pub fleet: Option<crate::fleet_member::FleetMembership>,
    pub retention: crate::retention::Retention,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if raw.host_name.is_empty()
            || !raw
                .host_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(invalid(format!(
                "host_name {:?} must be letters, digits, '-' and '.'",
                raw.host_name
            )));
        }
        let mem_bytes = parse_size(&raw.capacity.memory)
            .map_err(|e| invalid(format!("capacity.memory: {e}")))?;
        if mem_bytes == 0 || raw.capacity.vcpus == 0 {
            return Err(invalid(
                "capacity.memory and capacity.vcpus must be above zero".into(),
            ));
        }
        if !raw.state_dir.is_absolute() {
            return Err(invalid(format!(
                "state_dir {} must be an absolute path",
                raw.state_dir.display()
            )));
        }
        for (i, n) in raw.networks.iter().enumerate() {
            let named = !n.name.is_empty()
                && n.name.len() <= 63
                && n.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !named {
                return Err(invalid(format!(
                    "network name {:?} must be 1 to 63 lower-case letters, digits and '-'",
                    n.name
                )));
            }
            if raw.networks[..i].iter().any(|m| m.name == n.name) {
                return Err(invalid(format!("network {:?} is defined twice", n.name)));
            }
            if !is_ifname(&n.bridge) {
                return Err(invalid(format!(
                    "network {}: bridge {:?} is not an interface name (1 to 15 characters, no '/', ':' or whitespace)",
                    n.name, n.bridge
                )));
            }
            if let Some(ns) = n.netns.as_deref().filter(|ns| !is_netns_name(ns)) {
                return Err(invalid(format!(
                    "network {}: netns {ns:?} must be a name under /run/netns",
                    n.name
                )));
            }
        }
        if let Some(f) = &raw.fleet {
            f.check().map_err(|e| invalid(format!("fleet: {e}")))?;
        }
        raw.retention
            .check()
            .map_err(|e| invalid(format!("retention: {e}")))?;
        let ferry_bin = match raw.ferry_bin {
            Some(p) => p,
            None => default_ferry_bin()?,
        };
        Ok(Self {
            host_name: raw.host_name,
            peer_listen: raw.peer_listen,
            socket: raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            tls_dir: raw.tls_dir,
            insecure_plaintext_data_plane: raw.insecure_plaintext_data_plane,
            state_dir: raw.state_dir,
            ferry_bin,
            capacity: Capacity {
                mem_bytes,
                vcpus: raw.capacity.vcpus,
            },
            networks: raw.networks,
            fleet: raw.fleet,
            retention: raw.retention,
        })
    }

    /// The network called `name`, if this host has it.
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// This host's network names, for an error that lists them.
    pub fn network_names(&self) -> String {
        if self.networks.is_empty() {
            "none".into()
        } else {
            self.networks
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// `ferry` in the directory of this very executable.
fn default_ferry_bin() -> Result<PathBuf, ConfigError> {
    let exe = std::env::current_exe().map_err(|e| ConfigError::NoFerryBin(e.to_string()))?;
    let bin = exe.with_file_name("ferry");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(ConfigError::NoFerryBin(bin.display().to_string()))
    }
}

/// A size with a binary unit: `512M`, `8G`, `64MiB`. A bare number is
/// refused: it could mean bytes or MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("'{text}' is not a size (expected e.g. 512M or 8G)"));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => {
            return Err(format!(
                "'{text}' has no unit (write e.g. {text}M or {text}G)"
            ))
        }
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("'{text}' has an unknown unit (use K, M, G or T)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host_name = "host-a"
peer_listen = "127.0.0.1:7443"
socket = "/tmp/x.sock"
tls_dir = "/etc/ferry/tls"
state_dir = "/var/lib/ferry"
ferry_bin = "/usr/bin/ferry"
[capacity]
memory = "8G"
vcpus = 4
"#;

    #[test]
    fn a_full_config_parses() {
        let c = Config::parse(Path::new("h.toml"), GOOD).unwrap();
        assert_eq!(c.host_name, "host-a");
        assert_eq!(c.capacity.mem_bytes, 8 << 30);
        assert_eq!(c.capacity.vcpus, 4);
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.peer_listen.unwrap().port(), 7443);
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../host.example.toml");
        let c = Config::parse(
            Path::new("host.example.toml"),
            &format!("ferry_bin = \"/x\"\n{text}"),
        )
        .unwrap();
        assert_eq!(c.capacity.vcpus, 8);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn networks_parse_and_bad_ones_are_refused() {
        let with = |nets: &str| format!("{GOOD}{nets}");
        let c = Config::parse(
            Path::new("h.toml"),
            &with("[[network]]\nname = \"prod\"\nbridge = \"br0\"\n[[network]]\nname = \"lab\"\nbridge = \"br1\"\nnetns = \"hostA\"\n"),
        )
        .unwrap();
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.network("lab").unwrap().netns.as_deref(), Some("hostA"));
        assert!(c.network("nope").is_none());
        assert_eq!(c.network_names(), "prod, lab");
        for (nets, want) in [
            ("[[network]]\nname = \"Prod\"\nbridge = \"br0\"\n", "lower-case"),
            (
                "[[network]]\nname = \"a\"\nbridge = \"br0\"\n[[network]]\nname = \"a\"\nbridge = \"br1\"\n",
                "defined twice",
            ),
            (
                "[[network]]\nname = \"a\"\nbridge = \"a-bridge-name-too-long\"\n",
                "not an interface name",
            ),
            ("[[network]]\nname = \"a\"\nbridge = \"br0\"\nnetns = \"../x\"\n", "netns"),
            ("[[network]]\nname = \"a\"\nbridge = \"br0\"\nvlan = 3\n", "unknown field `vlan`"),
        ] {
            let e = Config::parse(Path::new("h.toml"), &with(nets)).unwrap_err();
            assert!(e.to_string().contains(want), "{nets}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let unknown = GOOD.replace("vcpus = 4", "vcpus = 4\ncpus = 2");
        let e = Config::parse(Path::new("h.toml"), &unknown).unwrap_err();
        assert!(e.to_string().contains("unknown field `cpus`"), "{e}");
        let bare = GOOD.replace("\"8G\"", "\"8\"");
        let e = Config::parse(Path::new("h.toml"), &bare).unwrap_err();
        assert!(e.to_string().contains("no unit"), "{e}");
        let relative = GOOD.replace("/var/lib/ferry", "state");
        assert!(Config::parse(Path::new("h.toml"), &relative).is_err());
        let no_host = GOOD.replace("host_name = \"host-a\"\n", "");
        let e = Config::parse(Path::new("h.toml"), &no_host).unwrap_err();
        assert!(e.to_string().contains("host_name"), "{e}");
    }
}
