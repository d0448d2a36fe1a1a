//! The glue between the VMM and the migration engine: a running `Vm` as
//! the engine's source, an `IncomingVm` as its destination.

pub mod disk_copy;
pub mod incoming;
pub mod network;
pub mod outgoing;
pub mod priority;
pub mod source;
pub mod storage;
