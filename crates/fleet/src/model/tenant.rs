//! A tenant: the owner of VMs, the unit that fairness and the per-tenant
//! cap count in.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    /// This tenant's own cap on concurrent migrations, below the fleet's
    /// per-tenant cap (never above it).
    #[serde(default)]
    pub max_concurrent_migrations: Option<u32>,
}
