//! The fleet scheduler's core: the fleet's model (hosts, VMs, tenants),
//! the policies it schedules under, a pure planner, drains as persisted
//! plans, the store they live in, the migrator the scheduler drives, and
//! a simulator that runs all of it on a simulated clock.
//!
//! The layers, bottom up:
//! - [`model`]: hosts, VMs, tenants, and [`model::Fleet`], the indexed view.
//! - [`policy`]: caps, headroom, pacing, priorities, retries; validated.
//! - [`planner`]: `decide()`, a pure function from the fleet, the policies,
//!   the waiting work and what is in flight to decisions with reasons.
//! - [`plan`]: plans and their entries, the duration model, drains, the
//!   dry run.
//! - [`store`]: the store interface, shaped like etcd's v3 (revisions,
//!   compare-and-swap transactions, leases that fence writes, changes since
//!   a revision), and two backends: in memory, and embedded in one redb
//!   file. redb because the agent already keeps its records in it: one
//!   database engine in the workspace, pure Rust, a durable commit per
//!   transaction, and a file lock that refuses a second scheduler on the
//!   same file.
//! - [`migrator`]: what the scheduler asks of hosts (start, poll, cancel,
//!   post-copy, terminate, boot); [`sim::SimMigrator`] implements it, and
//!   `ferry_agent::fleet_migrator` on ferryd's API.
//! - [`scheduler`]: carries out the planner's decisions, follows each
//!   migration to its end, retries elsewhere, persists every step first.
//! - [`leader`]: one scheduler of several leads (a claim under a lease);
//!   its writes are fenced by that claim.
//! - [`hosts`]: hosts register their capacity under a lease; a lapsed
//!   lease marks the host unreachable.
//! - [`agents`]: how the fleet reaches each host's agent, and the VM
//!   definitions a fresh boot needs (written by registering agents).
//! - [`watch`]: a serving leader notices plans another process wrote.
//! - [`sim`]: the generated fleet, the simulated migrator and clock, the
//!   audit of caps from the migrator's record, the report.

pub mod agents;
pub mod hosts;
pub mod leader;
pub mod migrator;
pub mod model;
pub mod plan;
pub mod planner;
pub mod policy;
pub mod scheduler;
pub mod serve;
pub mod sim;
pub mod store;
pub mod time;
pub mod watch;
pub mod web;
