//! A VM's place on one of the host's networks: the tap the agent creates
//! for it (persistent, so it outlives a ferryd restart as the VMM does),
//! attached to the network's bridge, named to its VMM with `--net`, and
//! removed once the VM is deleted or has left the host. The links are
//! made with iproute2's `ip`, the tool an operator would use by hand; a
//! MAC is generated when the definition gives none.

use std::process::Command;

use ferry_netlab::MacAddr;

use crate::config::Network;
use crate::model::{HostTap, NetDefinition};

/// The prefix of every tap the agent makes ("ferry"), so an operator
/// can tell them apart from others.
pub const TAP_PREFIX: &str = "fy";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network {network}: bridge {bridge} does not exist{} ({detail})", in_ns(.netns))]
    NoBridge {
        network: String,
        bridge: String,
        netns: Option<String>,
        detail: String,
    },
    #[error("network {network}: `ip {args}` failed: {detail}")]
    Ip {
        network: String,
        args: String,
        detail: String,
    },
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    NoIp(std::io::Error),
}

fn in_ns(netns: &Option<String>) -> String {
    netns
        .as_deref()
        .map_or_else(String::new, |ns| format!(" in network namespace {ns}"))
}

/// Why a definition's `mac` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("definition.net.mac {0:?} is not a MAC address (six pairs of hex digits joined by ':', e.g. 52:54:00:12:34:56)")]
    Malformed(String),
    #[error("definition.net.mac {0} is a multicast address; a card needs a unicast one (even first byte)")]
    Multicast(String),
    #[error("definition.net.mac 00:00:00:00:00:00 is not a card's address")]
    Zero,
}

/// The definition's MAC checked: a unicast, non-zero address.
pub fn parse_mac(text: &str) -> Result<MacAddr, MacError> {
    let mac: MacAddr = text
        .parse()
        .map_err(|_| MacError::Malformed(text.to_owned()))?;
    if mac.0[0] & 1 != 0 {
        return Err(MacError::Multicast(mac.to_string()));
    }
    if mac.0 == [0; 6] {
        return Err(MacError::Zero);
    }
    Ok(mac)
}

/// A fresh MAC under QEMU's and libvirt's 52:54:00 prefix (locally
/// administered, unicast), as an operator expects of a KVM guest.
pub fn generate_mac() -> MacAddr {
    let tail: [u8; 3] = rand::random();
    MacAddr([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
}

/// A fresh tap name: the prefix and 8 random hex digits (10 characters,
/// within the kernel's 15). Random rather than derived from the VM's id:
/// two agents sharing one namespace, or a VM coming back to a host whose
/// old tap is still being removed, never collide.
pub fn fresh_tap_name() -> String {
    format!("{TAP_PREFIX}{:08x}", rand::random::<u32>())
}

/// `ip [-n NS] ARGS`; its stderr on failure.
pub(crate) fn ip(
    netns: Option<&str>,
    args: &[&str],
) -> Result<Result<String, String>, NetworkError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.arg("-n").arg(ns);
    }
    let out = cmd.args(args).output().map_err(NetworkError::NoIp)?;
    if out.status.success() {
        Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

fn ip_or_fail(network: &Network, args: &[&str]) -> Result<String, NetworkError> {
    ip(network.netns.as_deref(), args)?.map_err(|detail| NetworkError::Ip {
        network: network.name.clone(),
        args: args.join(" "),
        detail,
    })
}

/// Checks that the network's bridge exists and is a bridge.
pub fn check_bridge(network: &Network) -> Result<(), NetworkError> {
    let no_bridge = |detail: String| NetworkError::NoBridge {
        network: network.name.clone(),
        bridge: network.bridge.clone(),
        netns: network.netns.clone(),
        detail,
    };
    match ip(
        network.netns.as_deref(),
        &["-d", "-o", "link", "show", "dev", &network.bridge],
    )? {
        Ok(text) if text.contains(" bridge ") => Ok(()),
        Ok(_) => Err(no_bridge(
            "an interface of that name is not a bridge".into(),
        )),
        Err(detail) => Err(no_bridge(detail)),
    }
}

/// The interface alias that marks a tap as made by the agent of host
/// `owner`: what lets a restarted agent tell its own orphaned taps from
/// another agent's on a shared namespace, or an operator's.
pub fn owner_alias(owner: &str) -> String {
    format!("ferry:{owner}")
}

/// Creates a persistent tap for a VM on `network`, attached to its bridge,
/// marked as `owner`'s and up. On any failure nothing is left behind.
pub fn create_tap(network: &Network, owner: &str) -> Result<HostTap, NetworkError> {
    check_bridge(network)?;
    let tap = HostTap {
        name: fresh_tap_name(),
        network: network.name.clone(),
        bridge: network.bridge.clone(),
        netns: network.netns.clone(),
    };
    // vnet_hdr: the VMM opens it with IFF_VNET_HDR.
    ip_or_fail(
        network,
        &["tuntap", "add", "dev", &tap.name, "mode", "tap", "vnet_hdr"],
    )?;
    let alias = owner_alias(owner);
    let attached = ip_or_fail(
        network,
        &[
            "link",
            "set",
            "dev",
            &tap.name,
            "master",
            &network.bridge,
            "alias",
            &alias,
        ],
    )
    .and_then(|_| ip_or_fail(network, &["link", "set", "dev", &tap.name, "up"]));
    if let Err(e) = attached {
        let _ = remove_tap(&tap);
        return Err(e);
    }
    Ok(tap)
}

/// Removes a VM's tap; one already gone is no error.
pub fn remove_tap(tap: &HostTap) -> Result<(), NetworkError> {
    match ip(tap.netns.as_deref(), &["link", "del", "dev", &tap.name])? {
        Ok(_) => Ok(()),
        Err(detail) if detail.contains("Cannot find device") || detail.contains("not exist") => {
            Ok(())
        }
        Err(detail) => Err(NetworkError::Ip {
            network: tap.network.clone(),
            args: format!("link del dev {}", tap.name),
            detail,
        }),
    }
}

/// Removes a tap, logging (not returning) a failure: for paths that must
/// go on (a delete, a failed start).
pub fn remove_tap_logged(tap: &HostTap, vm: &str) {
    if let Err(e) = remove_tap(tap) {
        tracing::error!("VM {vm}: cannot remove its tap {}: {e}", tap.name);
    }
}

/// The `--net` value for `ferry run`: the tap, its namespace, and the MAC.
pub fn run_flag(tap: &HostTap, mac: &str) -> String {
    format!("{},mac={mac}", receive_flag(tap))
}

/// The `--net` value for `ferry receive` (the MAC comes with the VM).
pub fn receive_flag(tap: &HostTap) -> String {
    match &tap.netns {
        Some(ns) => format!("tap={},netns={ns}", tap.name),
        None => format!("tap={}", tap.name),
    }
}

/// The definition's MAC, checked; for a definition already completed by
/// [`complete`].
pub fn mac_of(net: &NetDefinition) -> Result<MacAddr, MacError> {
    parse_mac(net.mac.as_deref().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_checked_and_generated_as_unicast() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:01").unwrap().to_string(),
            "52:54:00:ab:cd:01"
        );
        assert!(matches!(
            parse_mac("zz:00:00:00:00:01"),
            Err(MacError::Malformed(_))
        ));
        assert!(matches!(
            parse_mac("52:54:00:00:01"),
            Err(MacError::Malformed(_))
        ));
        assert!(matches!(
            parse_mac("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err(MacError::Zero));
        for _ in 0..16 {
            let m = generate_mac();
            assert_eq!(&m.0[..3], &[0x52, 0x54, 0x00]);
            assert!(parse_mac(&m.to_string()).is_ok());
        }
    }

    #[test]
    fn tap_names_fit_and_flags_name_the_namespace() {
        let name = fresh_tap_name();
        assert!(name.starts_with(TAP_PREFIX) && name.len() == 10, "{name}");
        assert!(crate::config::is_ifname(&name));
        let tap = HostTap {
            name: "fy00000001".into(),
            network: "prod".into(),
            bridge: "br0".into(),
            netns: Some("hostA".into()),
        };
        assert_eq!(
            run_flag(&tap, "52:54:00:00:00:01"),
            "tap=fy00000001,netns=hostA,mac=52:54:00:00:00:01"
        );
        let root = HostTap { netns: None, ..tap };
        assert_eq!(receive_flag(&root), "tap=fy00000001");
    }
}
