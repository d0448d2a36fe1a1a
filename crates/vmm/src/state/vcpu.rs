//! One vCPU's complete architectural state as KVM exposes it, saved while
//! the vCPU is parked and restored into a fresh vCPU before it first runs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Ioctl {
        vcpu: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM took {written} of {total} MSRs (first refused: {refused:#x})")]
    MsrsRefused {
        vcpu: u32,
        written: usize,
        total: usize,
        refused: u32,
    },
    #[error("vCPU {vcpu}: {0} MSRs is more than KVM accepts in one call", .count)]
    TooManyMsrs { vcpu: u32, count: usize },
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads everything from a parked vCPU. `msr_indices` are the MSRs KVM
    /// says can be saved; those this vCPU refuses to read are left out.
    /// `cpuid` is the table the VMM gave this vCPU: KVM_GET_CPUID2 on some
    /// hosts (PVM) answers with bits KVM would never accept as supported,
    /// which would make every destination look incompatible.
    pub fn save(
        fd: &VcpuFd,
        index: u32,
        msr_indices: &[u32],
        cpuid: Vec<kvm_cpuid_entry2>,
    ) -> Result<Self, VcpuStateError> {
        let err = |what| {
            move |source| VcpuStateError::Ioctl {
                vcpu: index,
                what,
                source,
            }
        };
        // Order follows the kernel's advice: events last on save's side
        // does not matter, but MP state first keeps a halted vCPU halted.
        Ok(Self {
            index,
            cpuid,
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, index, msr_indices)?,
            events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Writes everything into a vCPU that has not run yet, in the order
    /// KVM needs: CPUID before anything that depends on features, LAPIC
    /// before MSRs (TSC deadline), events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        self.restore_with(fd, false)
    }

    /// Like [`restore`](Self::restore); with `cpuid_in_place` the vCPU
    /// already holds exactly this CPUID (set before the blackout: at about
    /// 0.1 ms, KVM_SET_CPUID2 is the dearest part of a restore here).
    pub fn restore_with(&self, fd: &VcpuFd, cpuid_in_place: bool) -> Result<(), VcpuStateError> {
        let index = self.index;
        let err = |what| {
            move |source| VcpuStateError::Ioctl {
                vcpu: index,
                what,
                source,
            }
        };
        if !cpuid_in_place {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::Ioctl {
                vcpu: index,
                what: "building CPUID",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a full kvm_xsave (4 KiB) read by
        // KVM_GET_XSAVE; Vm refuses hosts whose XSAVE state is larger
        // (KVM_CAP_XSAVE2 > 4096), so KVM reads only inside it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VcpuStateError::TooManyMsrs {
            vcpu: index,
            count: self.msrs.len(),
        })?;
        let written = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(VcpuStateError::MsrsRefused {
                vcpu: index,
                written,
                total: self.msrs.len(),
                refused: self.msrs[written].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// KVM_GET_MSRS stops at the first MSR it cannot read; skip such MSRs and
/// go on, so one odd MSR does not lose the others.
fn read_msrs(
    fd: &VcpuFd,
    index: u32,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooManyMsrs {
            vcpu: index,
            count: entries.len(),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Ioctl {
                vcpu: index,
                what: "KVM_GET_MSRS",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}
