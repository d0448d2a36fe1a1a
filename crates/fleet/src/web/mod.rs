//! The fleet's read-only web page (`ferry fleet serve --web ADDR`): hosts,
//! VMs, plans, migrations in flight with their progress, and a plot of
//! each finished migration, drawn on the server (HTML and inline SVG; no
//! script, nothing fetched from elsewhere), with the same view as JSON at
//! `/api/fleet`.
//!
//! Every request reads the store afresh, all of it at once
//! ([`frozen::Frozen`]), through [`read_only::ReadOnly`], which refuses
//! every write, so no request can change the fleet. What
//! the agents know of their migrations (progress, reports) comes through a
//! [`migrations::MigrationSource`]: the fleet does not know how to reach
//! an agent's API, so `ferry` hands it ferry-agent's.
//!
//! - [`snapshot`]: what one request reads, as one serializable view.
//! - [`frozen`]: the store read once per request, then served from memory.
//! - [`migrations`]: the migrations' view and the trait that supplies it.
//! - [`html`]: the page, every text escaped.
//! - [`svg`]: the plot of a finished migration.
//! - [`server`]: axum on its own thread; GET and HEAD only.

pub mod frozen;
pub mod html;
pub mod migrations;
pub mod read_only;
pub mod server;
pub mod snapshot;
pub mod svg;

pub use migrations::{MigrationSource, MigrationView, NoMigrations};
pub use server::{WebError, WebServer};
pub use snapshot::{snapshot, FleetView};
