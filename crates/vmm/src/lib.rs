//! Ferry's KVM micro-VM: it owns a guest's memory, vCPUs and devices, boots
//! an ELF guest straight into 64-bit ring 3, and can pause and resume every
//! vCPU. It knows nothing about networks of hosts; the migration engine
//! drives it through the controls it exposes.

pub mod boot;
pub mod compat;
pub mod config;
pub mod devices;
pub mod dirty;
pub mod events;
pub mod kvm;
pub mod layout;
pub mod lazy;
pub mod memory;
pub mod page_runs;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use config::GuestImage;
pub use config::{ConfigError, VmConfig};
pub use events::{ConsoleLine, StopReason, VmEvent};
pub use kvm::{KvmError, KvmHost};
pub use memory::{GuestRam, MemoryError};
pub use vm::{Paused, Vm, VmError};
