//! Kicking a vCPU out of KVM_RUN: a real-time signal whose handler sets
//! `immediate_exit` in the running thread's kvm_run. Setting the flag (not
//! just interrupting the ioctl) closes the race where the signal lands just
//! before the thread enters KVM_RUN: KVM then returns EINTR at once.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    static RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = RUN_AREA.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is set by `bind_run_area` on this very thread
        // to its vCPU's kvm_run mapping, and cleared before that mapping is
        // dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// Ties the kick handler on this thread to `run`, until the guard drops.
pub struct RunAreaBinding(());

pub fn bind_run_area(run: *mut kvm_run) -> RunAreaBinding {
    RUN_AREA.with(|c| c.set(run));
    RunAreaBinding(())
}

impl Drop for RunAreaBinding {
    fn drop(&mut self) {
        RUN_AREA.with(|c| c.set(std::ptr::null_mut()));
    }
}
