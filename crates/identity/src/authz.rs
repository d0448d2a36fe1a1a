//! Who may do what: an explicit list of allowed peers, deny by default
//! (in the spirit of QEMU's `tls-authz`).

use std::fmt;

use crate::peer::{PeerIdentity, Role};

/// The peers a connection accepts. [`Allowed::default`] allows nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    hosts: Vec<String>,
    operators: Operators,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Operators {
    #[default]
    None,
    Any,
    Named(Vec<String>),
}

impl Allowed {
    /// Nobody: every peer is refused.
    pub fn nobody() -> Self {
        Self::default()
    }

    /// Exactly these hosts (e.g. the source that prepared this migration).
    pub fn hosts<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::nobody().and_hosts(names)
    }

    /// Any operator of the fleet.
    pub fn operators() -> Self {
        Self::nobody().and_operators()
    }

    /// Also these hosts.
    pub fn and_hosts<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.hosts.extend(names.into_iter().map(Into::into));
        self
    }

    /// Also any operator.
    pub fn and_operators(mut self) -> Self {
        self.operators = Operators::Any;
        self
    }

    /// Also these operators (ignored if any operator is already allowed).
    pub fn and_operator_names<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names = names.into_iter().map(Into::into);
        match &mut self.operators {
            Operators::Any => {}
            Operators::Named(list) => list.extend(names),
            Operators::None => self.operators = Operators::Named(names.collect()),
        }
        self
    }

    /// Whether `peer` is allowed. Names compare ignoring ASCII case, as
    /// the DNS names in the certificates do.
    pub fn permits(&self, peer: &PeerIdentity) -> bool {
        let listed = |list: &[String]| list.iter().any(|n| n.eq_ignore_ascii_case(&peer.name));
        match peer.role {
            Role::Host => listed(&self.hosts),
            Role::Operator => match &self.operators {
                Operators::None => false,
                Operators::Any => true,
                Operators::Named(list) => listed(list),
            },
        }
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match self.hosts.as_slice() {
            [] => {}
            [one] => parts.push(format!("host {one}")),
            many => parts.push(format!("hosts {}", many.join(", "))),
        }
        match &self.operators {
            Operators::None => {}
            Operators::Any => parts.push("any operator".to_string()),
            Operators::Named(list) if list.is_empty() => {}
            Operators::Named(list) => parts.push(format!("operator(s) {}", list.join(", "))),
        }
        if parts.is_empty() {
            f.write_str("nobody")
        } else {
            f.write_str(&parts.join(" or "))
        }
    }
}

/// A verified peer that is not allowed here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused {peer}: this connection accepts only {expected}")]
pub struct AuthzError {
    /// Who was refused.
    pub peer: PeerIdentity,
    /// Who was expected, as [`Allowed`] displays it.
    pub expected: String,
}

/// Deny by default: `Ok` only if `allowed` lists `peer`.
pub fn authorize(peer: &PeerIdentity, allowed: &Allowed) -> Result<(), AuthzError> {
    if allowed.permits(peer) {
        Ok(())
    } else {
        Err(AuthzError {
            peer: peer.clone(),
            expected: allowed.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_allowed_by_default() {
        for peer in [PeerIdentity::host("hostA"), PeerIdentity::operator("alice")] {
            let err = authorize(&peer, &Allowed::default()).unwrap_err();
            assert_eq!(err.peer, peer);
            assert!(err.to_string().contains("accepts only nobody"), "{err}");
        }
    }

    #[test]
    fn only_the_listed_hosts_pass() {
        let allowed = Allowed::hosts(["hostA"]);
        assert_eq!(authorize(&PeerIdentity::host("hostA"), &allowed), Ok(()));
        assert_eq!(authorize(&PeerIdentity::host("HOSTA"), &allowed), Ok(()));
        let err = authorize(&PeerIdentity::host("hostC"), &allowed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refused host hostC: this connection accepts only host hostA"
        );
        // An operator named like an allowed host is still not that host.
        assert!(authorize(&PeerIdentity::operator("hostA"), &allowed).is_err());
    }

    #[test]
    fn operators_are_a_separate_grant() {
        let alice = PeerIdentity::operator("alice");
        assert!(authorize(&alice, &Allowed::operators()).is_ok());
        assert!(authorize(&PeerIdentity::host("hostA"), &Allowed::operators()).is_err());
        let named = Allowed::hosts(["hostA"]).and_operator_names(["bob"]);
        assert!(authorize(&alice, &named).is_err());
        assert!(authorize(&PeerIdentity::operator("bob"), &named).is_ok());
        assert_eq!(named.to_string(), "host hostA or operator(s) bob");
    }
}
