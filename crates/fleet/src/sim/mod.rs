//! The fleet simulator: the real scheduler and planner, a simulated
//! migrator on a simulated clock, a generated fleet, and an audit of what
//! ran against the caps, from the migrator's own record.

pub mod audit;
pub mod fixtures;
pub mod generate;
pub mod migrator;
pub mod report;
pub mod runner;
pub mod simulate;

pub use audit::{audit, Audit};
pub use fixtures::open_simulated;
pub use generate::{generate, FleetSpec};
pub use migrator::{MigrationRecord, SimMigrator};
pub use report::SimReport;
pub use runner::{run, RunLimits, RunOutcome};
pub use simulate::{simulate, SimConfig, SimError, SimProgress};
