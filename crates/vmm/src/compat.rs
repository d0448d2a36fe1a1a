//! Can this host take a VM that runs elsewhere? Checked when a migration
//! is offered, before any memory is reserved or a page moves, so that an
//! incompatible destination refuses with a reason and the source never
//! pauses.

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Cap;

use crate::kvm::{KvmError, KvmHost};
use crate::memory::{check_size, host_available_bytes, MemoryError};

/// What the operator lets incoming VMs use on this host.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingLimits {
    pub max_mem_bytes: Option<u64>,
    pub max_vcpus: Option<u32>,
}

/// The shape of an offered VM, as the destination needs to judge it.
#[derive(Debug, Clone)]
pub struct OfferedVm<'a> {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub tsc_khz: u32,
    pub cpuid: &'a [kvm_cpuid_entry2],
}

#[derive(Debug, thiserror::Error)]
pub enum Incompatible {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(
        "the VM has {mem_mib} MiB of memory; this host accepts at most {limit_mib} MiB (--max-mem)"
    )]
    MemoryLimit { mem_mib: u64, limit_mib: u64 },
    #[error("cannot reserve the VM's memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("the VM has {vcpus} vCPUs; this host accepts at most {limit} ({why})")]
    TooManyVcpus {
        vcpus: u32,
        limit: u64,
        why: &'static str,
    },
    #[error("the VM runs with a TSC of {vm_khz} kHz; this host runs at {host_khz} kHz and KVM here cannot scale the TSC")]
    Tsc { vm_khz: u32, host_khz: u32 },
    #[error("the VM uses CPU features this host lacks: CPUID leaf {leaf:#x}.{index} {register} bits {missing:#010x}")]
    CpuFeatures {
        leaf: u32,
        index: u32,
        register: &'static str,
        missing: u32,
    },
}

/// The CPUID leaves whose registers are feature bit sets: a guest may rely
/// on any bit it was shown, so the destination must offer every one.
const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];

pub fn check_incoming(
    host: &KvmHost,
    vm: &OfferedVm<'_>,
    limits: &IncomingLimits,
) -> Result<(), Incompatible> {
    if let Some(limit) = limits.max_mem_bytes {
        if vm.mem_bytes > limit {
            return Err(Incompatible::MemoryLimit {
                mem_mib: vm.mem_bytes >> 20,
                limit_mib: limit >> 20,
            });
        }
    }
    check_size(vm.mem_bytes, host_available_bytes()?)?;
    if let Some(limit) = limits.max_vcpus {
        if vm.vcpus > limit {
            return Err(Incompatible::TooManyVcpus {
                vcpus: vm.vcpus,
                limit: limit.into(),
                why: "--max-vcpus",
            });
        }
    }
    if vm.vcpus as usize > host.max_vcpus() {
        return Err(Incompatible::TooManyVcpus {
            vcpus: vm.vcpus,
            limit: host.max_vcpus() as u64,
            why: "KVM's limit",
        });
    }
    let host_khz = host_tsc_khz(host)?;
    if host_khz != vm.tsc_khz && !host.kvm().check_extension(Cap::TscControl) {
        return Err(Incompatible::Tsc {
            vm_khz: vm.tsc_khz,
            host_khz,
        });
    }
    check_cpuid(vm.cpuid, host.supported_cpuid()?.as_slice())
}

/// The CPUID table as it travels in an offer.
pub fn encode_cpuid(entries: &[kvm_cpuid_entry2]) -> Vec<u8> {
    postcard::to_stdvec(entries).expect("CPUID entries always encode")
}

pub fn decode_cpuid(bytes: &[u8]) -> Result<Vec<kvm_cpuid_entry2>, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("the offered CPUID table is malformed: {e}"))
}

/// Every feature bit the VM was shown must be one this host supports.
pub fn check_cpuid(vm: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Result<(), Incompatible> {
    let find = |set: &[kvm_cpuid_entry2], leaf: u32, index: u32| {
        set.iter()
            .find(|e| e.function == leaf && e.index == index)
            .copied()
    };
    for &(leaf, index) in FEATURE_LEAVES {
        let Some(wanted) = find(vm, leaf, index) else {
            continue;
        };
        let offered = find(host, leaf, index).unwrap_or_default();
        let registers = [
            ("ebx", wanted.ebx, offered.ebx),
            ("ecx", wanted.ecx, offered.ecx),
            ("edx", wanted.edx, offered.edx),
        ];
        for (register, want, have) in registers {
            // Leaf 1 EBX holds the APIC id and counts, not features.
            if leaf == 1 && register == "ebx" {
                continue;
            }
            let missing = want & !have;
            if missing != 0 {
                return Err(Incompatible::CpuFeatures {
                    leaf,
                    index,
                    register,
                    missing,
                });
            }
        }
    }
    Ok(())
}

/// The TSC frequency a new vCPU gets on this host.
fn host_tsc_khz(host: &KvmHost) -> Result<u32, KvmError> {
    let vm = host.kvm().create_vm().map_err(KvmError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(KvmError::CreateVm)?;
    vcpu.get_tsc_khz().map_err(KvmError::CreateVm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let host = [entry(1, 0b0110)];
        assert!(check_cpuid(&[entry(1, 0b0100)], &host).is_ok());
        let err = check_cpuid(&[entry(1, 0b1100)], &host).unwrap_err();
        assert!(
            matches!(
                err,
                Incompatible::CpuFeatures {
                    leaf: 1,
                    missing: 0b1000,
                    register: "ecx",
                    ..
                }
            ),
            "{err}"
        );
        // A leaf the host does not list offers nothing.
        assert!(check_cpuid(&[entry(0x8000_0001, 1)], &host).is_err());
    }
}
