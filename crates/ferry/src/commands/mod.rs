//! One module per subcommand.

pub mod demo;
pub mod restore;
pub mod run;
pub mod snapshot;
