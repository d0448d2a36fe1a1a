//! vCPU threads: one per vCPU, each a small loop that runs the guest,
//! routes its I/O and MMIO exits to the bus, and obeys the run gate (run, pause,
//! stop). While a vCPU is parked its `VcpuFd` is free for the controller to
//! read or write its state.

pub mod gate;
pub mod kick;
pub mod setup;
pub mod throttle;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{IoBus, PioOutcome};
use crate::events::{StopReason, VmEvent};
use gate::{RunGate, Want};

/// A vCPU's file descriptor, shared between its thread and the controller.
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// What one KVM_RUN ended with, detached from the borrow of the vCPU.
enum Step {
    Continue,
    Stop(StopReason),
}

pub fn spawn(
    index: u32,
    vcpu: SharedVcpu,
    gate: Arc<RunGate>,
    bus: Arc<IoBus>,
    events: Sender<VmEvent>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            if let Some(reason) = run_loop(index, &vcpu, &gate, &bus) {
                let _ = events.send(VmEvent::Stopped(reason));
            }
            gate.mark_exited();
        })
}

/// Runs until stopped; returns why the guest stopped by itself, if it did.
fn run_loop(index: u32, vcpu: &SharedVcpu, gate: &RunGate, bus: &IoBus) -> Option<StopReason> {
    let mut fd = vcpu.lock().unwrap();
    let _binding = kick::bind_run_area(fd.get_kvm_run() as *mut _);
    // Whether this vCPU entered the guest since it last parked.
    let mut ran = false;
    loop {
        match gate.wanted() {
            Want::Run => {}
            Want::Stop => return None,
            Want::Pause => {
                drop(fd);
                let next = gate.park(index as usize, ran);
                ran = false;
                fd = vcpu.lock().unwrap();
                if next == Want::Stop {
                    return None;
                }
                continue;
            }
        }
        gate.note_running();
        ran = true;
        match run_once(index, &mut fd, bus) {
            Step::Continue => {}
            Step::Stop(reason) => return Some(reason),
        }
    }
}

fn run_once(index: u32, fd: &mut VcpuFd, bus: &IoBus) -> Step {
    let failed = |reason: String| {
        Step::Stop(StopReason::Failed {
            vcpu: index,
            reason,
        })
    };
    let step = match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => match bus.pio_out(port, data) {
            PioOutcome::Continue => Step::Continue,
            PioOutcome::GuestExit(code) => Step::Stop(StopReason::GuestExit { code }),
        },
        Ok(VcpuExit::IoIn(port, data)) => {
            bus.pio_in(port, data);
            Step::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            bus.mmio_read(addr, data);
            Step::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            bus.mmio_write(addr, data);
            Step::Continue
        }
        Ok(VcpuExit::Shutdown) => Step::Stop(StopReason::TripleFault {
            vcpu: index,
            rip: 0,
        }),
        Ok(VcpuExit::Hlt) => Step::Stop(StopReason::Halted { vcpu: index }),
        Ok(VcpuExit::InternalError) => failed("KVM internal error (emulation failure)".into()),
        Ok(VcpuExit::FailEntry(reason, _)) => {
            failed(format!("VM entry failed (reason {reason:#x})"))
        }
        Ok(other) => failed(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // A kick: the gate says what to do next.
            fd.set_kvm_immediate_exit(0);
            Step::Continue
        }
        Err(e) => failed(format!("KVM_RUN failed: {e}")),
    };
    match step {
        Step::Stop(StopReason::TripleFault { vcpu, .. }) => {
            let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
            Step::Stop(StopReason::TripleFault { vcpu, rip })
        }
        other => other,
    }
}
