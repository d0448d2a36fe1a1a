//! What a running VM tells its owner: console lines and why it stopped.

use std::time::Instant;

/// One line the guest wrote on its console, stamped when it arrived.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    pub at: Instant,
    pub text: String,
}

/// Why a VM stopped running on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit code to the exit port.
    GuestExit { code: u8 },
    /// A vCPU raised an exception with no handler: a triple fault.
    TripleFault { vcpu: u32, rip: u64 },
    /// A vCPU executed `hlt` with interrupts off and nothing to wake it.
    Halted { vcpu: u32 },
    /// KVM or the VMM failed while running a vCPU.
    Failed { vcpu: u32, reason: String },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestExit { code } => write!(f, "guest exited with code {code}"),
            StopReason::TripleFault { vcpu, rip } => {
                write!(f, "guest triple fault on vCPU {vcpu} at rip {rip:#x}")
            }
            StopReason::Halted { vcpu } => write!(f, "guest halted on vCPU {vcpu}"),
            StopReason::Failed { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum VmEvent {
    Console(ConsoleLine),
    Stopped(StopReason),
}
