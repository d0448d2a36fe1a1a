//! What the fleet is made of: hosts, VMs, tenants, and the indexed view of
//! all of them that the planner reads.

pub mod fleet;
pub mod host;
pub mod resources;
pub mod tenant;
pub mod vm;

pub use fleet::{Fleet, FleetError, HostIx, VmIx};
pub use host::{Health, Host, Maintenance, ReceiveSetup, Version};
pub use resources::{Resources, GIB, MIB};
pub use tenant::Tenant;
pub use vm::{Availability, MigrationPolicy, OnHostMaintenance, Vm, VmRunState};
