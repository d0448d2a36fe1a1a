//! One module per subcommand.

pub mod bench;
pub mod ca;
pub mod demo;
pub mod fleet;
pub mod fleet_etcd;
pub mod fleet_plans;
pub mod fleet_store_args;
pub mod host;
pub mod migrate;
pub mod migration;
pub mod receive;
pub mod restore;
pub mod run;
pub mod snapshot;
pub mod vm;
