//! Pre-copy live migration: the VM keeps running while its memory is sent
//! in rounds, then pauses briefly for the last pages and its state.

mod decision;
pub mod destination;
pub mod error;
mod parallel_receive;
mod parallel_send;
pub mod send;
pub mod source;
pub mod stripes;

pub use destination::{
    receive, send_resumed, send_started, CommitTiming, ReceiveOptions, ReceiveReport, Received,
};
pub use error::{error_chain, MigrateError, ReceiveError};
pub use source::{migrate, resume_postcopy, Failure, MigrateOptions};
