//! Caps on migrations running at once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    /// Migrations leaving one host at once (KubeVirt's
    /// parallelOutboundMigrationsPerNode is 2).
    pub host_outbound: u32,
    /// Migrations arriving at one host at once (KubeVirt has none; vSphere
    /// counts both ends).
    pub host_inbound: u32,
    /// Migrations of one tenant's VMs at once.
    pub per_tenant: u32,
    /// Migrations in the whole fleet at once.
    pub fleet: u32,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            host_outbound: 2,
            host_inbound: 2,
            per_tenant: 8,
            fleet: 64,
        }
    }
}
