//! Taps a previous agent of this host made and no record names any more:
//! made for a VM or an incoming migration, the agent was killed before it
//! wrote the record (or before it removed the tap of one that ended).
//! They outlive the agent on purpose (a VM's tap must survive a restart),
//! so nobody else ever removes them. At start, once every VM and incoming
//! migration is re-adopted and before the API serves, the agent removes
//! the taps marked as its own ([`owner_alias`]) that none of them names.
//! A tap of another host's agent on a shared namespace, or an operator's,
//! carries no such mark and is never touched.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::config::Network;
use crate::network::{ip, owner_alias, NetworkError, TAP_PREFIX};

/// One interface of `ip -j link show type tun`.
#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    ifalias: Option<String>,
}

/// A tap removed, or one that could not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub netns: Option<String>,
    pub tap: String,
    /// None once removed; else why it stays.
    pub error: Option<String>,
}

/// The taps of namespace `netns` (none: the agent's own) marked as
/// `owner`'s.
fn owned_taps(netns: Option<&str>, owner: &str) -> Result<Vec<String>, NetworkError> {
    let text =
        ip(netns, &["-j", "link", "show", "type", "tun"])?.map_err(|detail| NetworkError::Ip {
            network: netns.unwrap_or("(the agent's namespace)").to_owned(),
            args: "-j link show type tun".into(),
            detail,
        })?;
    Ok(parse_owned(&text, &owner_alias(owner)))
}

fn parse_owned(json: &str, alias: &str) -> Vec<String> {
    let links: Vec<Link> = match serde_json::from_str(json) {
        Ok(l) => l,
        // An empty namespace prints nothing, not "[]", on some iproute2.
        Err(_) if json.trim().is_empty() => Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read `ip -j link show type tun`: {e}");
            Vec::new()
        }
    };
    links
        .into_iter()
        .filter(|l| l.ifname.starts_with(TAP_PREFIX) && l.ifalias.as_deref() == Some(alias))
        .map(|l| l.ifname)
        .collect()
}

/// Removes `owner`'s taps on the namespaces of `networks` that are not in
/// `in_use`; returns each one it found. A namespace it cannot list is
/// logged and skipped: the taps there stay, which costs only an interface.
pub fn remove_orphans(networks: &[Network], owner: &str, in_use: &BTreeSet<String>) -> Vec<Orphan> {
    let namespaces: BTreeSet<Option<&str>> = networks.iter().map(|n| n.netns.as_deref()).collect();
    let mut found = Vec::new();
    for netns in namespaces {
        let taps = match owned_taps(netns, owner) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("cannot look for orphaned taps: {e}");
                continue;
            }
        };
        for tap in taps.into_iter().filter(|t| !in_use.contains(t)) {
            let error = match ip(netns, &["link", "del", "dev", &tap]) {
                Ok(Ok(_)) => None,
                Ok(Err(detail)) => Some(detail),
                Err(e) => Some(e.to_string()),
            };
            match &error {
                None => tracing::warn!(
                    "removed tap {tap}{}: made by this host's agent, named by no VM or incoming migration",
                    netns.map_or_else(String::new, |ns| format!(" in namespace {ns}"))
                ),
                Some(e) => tracing::error!("cannot remove orphaned tap {tap}: {e}"),
            }
            found.push(Orphan {
                netns: netns.map(str::to_owned),
                tap,
                error,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_taps_marked_as_this_hosts_are_its_own() {
        let json = r#"[
            {"ifindex":5,"ifname":"fy00000001","ifalias":"ferry:hostB"},
            {"ifindex":6,"ifname":"fy00000002","ifalias":"ferry:hostA"},
            {"ifindex":7,"ifname":"fy00000003"},
            {"ifindex":8,"ifname":"tap0","ifalias":"ferry:hostB"},
            {"ifindex":9,"ifname":"fy00000004","ifalias":"ferry:hostBB"}
        ]"#;
        assert_eq!(parse_owned(json, &owner_alias("hostB")), vec!["fy00000001"]);
        assert!(parse_owned("", "ferry:hostB").is_empty());
        assert!(parse_owned("not json", "ferry:hostB").is_empty());
    }
}
