//! The register state a vCPU starts with: already in 64-bit mode at CPL 3,
//! paging on, flat ring-3 segments and the TSS the boot module wrote. This
//! is the measured recipe that runs a guest with no ring-0 code on PVM.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::VcpuFd;

use crate::boot::{BootEntry, GDT_BYTES, TSS_LIMIT, TSS_SELECTOR, USER_CS, USER_DS};
use crate::layout::{GDT_ADDR, PML4_ADDR, TSS_ADDR};

const CR0_PE_MP_ET_NE_WP_AM_PG: u64 = 0x8005_0033;
const CR4_PAE_OSFXSR_OSXMMEXCPT: u64 = 0x620;
const EFER_SCE_LME_LMA_NX: u64 = 0xd01;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("KVM_SET_CPUID2 failed on vCPU {vcpu}: {source}")]
    Cpuid {
        vcpu: u32,
        source: kvm_ioctls::Error,
    },
    #[error("setting the initial registers of vCPU {vcpu} failed ({what}): {source}")]
    Registers {
        vcpu: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    entry: BootEntry,
    cpuid: &CpuId,
) -> Result<(), SetupError> {
    let mut cpuid = cpuid.clone();
    patch_cpuid(&mut cpuid, index);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| SetupError::Cpuid {
            vcpu: index,
            source,
        })?;
    let regs_err = |what| {
        move |source| SetupError::Registers {
            vcpu: index,
            what,
            source,
        }
    };

    let mut sregs = vcpu.get_sregs().map_err(regs_err("KVM_GET_SREGS"))?;
    set_long_mode_ring3(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(regs_err("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(regs_err("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry.rip,
        rflags: 0x2,
        rdi: u64::from(index),
        rsi: entry.start_info,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(regs_err("KVM_SET_REGS"))?;

    // Application processors wait for INIT/SIPI by default; ours start
    // directly, like the boot processor.
    if index != 0 {
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(regs_err("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

fn set_long_mode_ring3(sregs: &mut kvm_sregs) {
    sregs.cs = segment(USER_CS, 0xb, true);
    let data = segment(USER_DS, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gs = sregs.fs;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_BYTES - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE_MP_ET_NE_WP_AM_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE_OSFXSR_OSXMMEXCPT;
    sregs.efer = EFER_SCE_LME_LMA_NX;
}

/// The CPUID table vCPU `index` runs with: the VM's table with that
/// vCPU's own APIC ID.
pub fn vcpu_cpuid(base: &[kvm_cpuid_entry2], index: u32) -> Vec<kvm_cpuid_entry2> {
    let mut entries = base.to_vec();
    patch_entries(&mut entries, index);
    entries
}

/// Gives each vCPU its own APIC ID in the leaves that report it.
fn patch_cpuid(cpuid: &mut CpuId, index: u32) {
    patch_entries(cpuid.as_mut_slice(), index);
}

fn patch_entries(entries: &mut [kvm_cpuid_entry2], index: u32) {
    for entry in entries {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
    }
}
