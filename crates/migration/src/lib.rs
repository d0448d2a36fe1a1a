//! Ferry's migration engine, independent of KVM: the wire protocol, the
//! pre-copy strategy with its switchover and auto-converge policy, the
//! bandwidth cap, the commit handshake and the report.
//!
//! Nothing here knows about KVM or guest memory mappings: the engine drives
//! any VM that implements the traits in [`guest`], so its logic is tested
//! against an in-memory guest ([`synthetic`]) as well as real VMs.

pub mod auto;
pub mod bandwidth;
pub mod bitmap;
pub mod cancel;
pub mod cpu_clock;
pub mod error;
pub mod guest;
pub mod handover;
pub mod mode;
pub mod policy;
pub mod postcopy;
pub mod precopy;
pub mod protocol;
mod reconnect;
pub mod shared_pages;
pub mod stats;
pub mod synthetic;
pub mod synthetic_net;
pub mod thread_priority;
pub mod transport;
pub mod tuning;

pub use error::ProtocolError;
