//! One module per subcommand.

pub mod bench;
pub mod ca;
pub mod demo;
pub mod fleet;
pub mod fleet_etcd;
pub mod migrate;
pub mod migration;
pub mod receive;
pub mod restore;
pub mod run;
pub mod snapshot;
pub mod vm;
