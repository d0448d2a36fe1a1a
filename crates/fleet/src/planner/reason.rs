//! Why a VM waits, in words an operator acts on. Names, not indexes, so a
//! reason can be stored in a plan and read later.

use serde::{Deserialize, Serialize};

use crate::model::resources::show_bytes;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WaitReason {
    FleetSlot {
        running: u32,
        cap: u32,
    },
    OutboundSlot {
        host: String,
        holders: Vec<String>,
    },
    TenantSlot {
        tenant: String,
        cap: u32,
        holders: Vec<String>,
    },
    /// Every target that fits is at its inbound cap; `host` is the best.
    InboundSlot {
        host: String,
        holders: Vec<String>,
    },
    PacedRack {
        rack: String,
        started: u32,
        interval_ms: u64,
    },
    PacedFleet {
        started: u32,
        interval_ms: u64,
    },
    NoTarget {
        mem_bytes: u64,
        vcpus: u32,
        detail: String,
    },
    /// The operator named a target that cannot take the VM.
    TargetRefused {
        host: String,
        why: String,
    },
    /// Its VM is migrating under another entry.
    AlreadyMigrating,
    SourceUnreachable {
        host: String,
    },
    /// Its policy says TERMINATE and nothing restarts it.
    TerminatePerPolicy,
}

fn held_by(holders: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = holders
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if holders.len() > SHOWN {
        s.push_str(&format!(" and {} more", holders.len() - SHOWN));
    }
    s
}

fn seconds(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1e3)
    }
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FleetSlot { running, cap } => write!(
                f,
                "waiting for a fleet-wide slot: {running} of {cap} migrations running"
            ),
            Self::OutboundSlot { host, holders } => write!(
                f,
                "waiting for an outbound slot on {host} held by {}",
                held_by(holders)
            ),
            Self::TenantSlot {
                tenant,
                cap,
                holders,
            } => write!(
                f,
                "waiting for a slot of tenant {tenant} ({cap} at once) held by {}",
                held_by(holders)
            ),
            Self::InboundSlot { host, holders } => write!(
                f,
                "waiting for an inbound slot on {host} (the best target that fits) held by {}",
                held_by(holders)
            ),
            Self::PacedRack {
                rack,
                started,
                interval_ms,
            } => write!(
                f,
                "paced: rack {rack} started {started} migrations in the last {}",
                seconds(*interval_ms)
            ),
            Self::PacedFleet {
                started,
                interval_ms,
            } => write!(
                f,
                "paced: the fleet started {started} migrations in the last {}",
                seconds(*interval_ms)
            ),
            Self::NoTarget {
                mem_bytes,
                vcpus,
                detail,
            } => write!(
                f,
                "no target with {} and {vcpus} vCPUs free{}{detail}",
                show_bytes(*mem_bytes),
                if detail.is_empty() { "" } else { ": " }
            ),
            Self::TargetRefused { host, why } => write!(f, "target {host} refused: {why}"),
            Self::AlreadyMigrating => write!(f, "already migrating under another entry"),
            Self::SourceUnreachable { host } => {
                write!(
                    f,
                    "its host {host} is unreachable: nothing can be asked of it"
                )
            }
            Self::TerminatePerPolicy => write!(f, "terminate per policy (no automatic restart)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GIB;

    #[test]
    fn reasons_read_as_sentences() {
        let r = WaitReason::OutboundSlot {
            host: "h3".into(),
            holders: vec!["vm7".into()],
        };
        assert_eq!(
            r.to_string(),
            "waiting for an outbound slot on h3 held by vm7"
        );
        let r = WaitReason::PacedRack {
            rack: "r3".into(),
            started: 2,
            interval_ms: 10_000,
        };
        assert_eq!(
            r.to_string(),
            "paced: rack r3 started 2 migrations in the last 10 s"
        );
        let r = WaitReason::NoTarget {
            mem_bytes: 4 * GIB,
            vcpus: 2,
            detail: String::new(),
        };
        assert_eq!(r.to_string(), "no target with 4 GiB and 2 vCPUs free");
        let r = WaitReason::TenantSlot {
            tenant: "a".into(),
            cap: 1,
            holders: (0..5).map(|i| format!("vm{i}")).collect(),
        };
        assert!(r.to_string().ends_with("vm0, vm1, vm2 and 2 more"), "{r}");
    }
}
