//! The host's KVM: opening it with errors a person can act on, and checking
//! the capabilities Ferry relies on before anything is created.

use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// The KVM device node, unless `FERRY_KVM_DEVICE` names another one (tests
/// use that to exercise the "no KVM here" path on a host that has KVM).
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{path} does not exist: this host offers no KVM (enable virtualization or load the kvm module)")]
    Missing { path: PathBuf },
    #[error("permission denied opening {path}: run as root or join the group that owns it")]
    PermissionDenied { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} speaks KVM API version {found}, Ferry needs 12")]
    ApiVersion { path: PathBuf, found: i32 },
    #[error("this host's KVM lacks {0}, which Ferry needs")]
    MissingCapability(&'static str),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
}

/// An open, checked KVM.
pub struct KvmHost {
    kvm: Kvm,
    path: PathBuf,
}

/// Capabilities without which Ferry cannot run a guest at all.
const REQUIRED: &[(Cap, &str)] = &[
    (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
    (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (needed to pause vCPUs)",
    ),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
];

impl KvmHost {
    /// Opens the KVM device (`FERRY_KVM_DEVICE` or /dev/kvm) and checks it.
    pub fn open() -> Result<Self, KvmError> {
        let path = std::env::var_os("FERRY_KVM_DEVICE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE));
        Self::open_path(&path)
    }

    pub fn open_path(path: &Path) -> Result<Self, KvmError> {
        let kvm = Kvm::new_with_path(path_to_cstring(path)?.as_c_str()).map_err(|e| {
            let io = std::io::Error::from_raw_os_error(e.errno());
            match io.kind() {
                std::io::ErrorKind::NotFound => KvmError::Missing {
                    path: path.to_owned(),
                },
                std::io::ErrorKind::PermissionDenied => KvmError::PermissionDenied {
                    path: path.to_owned(),
                },
                _ => KvmError::Open {
                    path: path.to_owned(),
                    source: io,
                },
            }
        })?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        for (cap, name) in REQUIRED {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        Ok(Self {
            kvm,
            path: path.to_owned(),
        })
    }

    /// Most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }
}

fn path_to_cstring(path: &Path) -> Result<std::ffi::CString, KvmError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Open {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_says_so() {
        let err = KvmHost::open_path(Path::new("/nonexistent/kvm"))
            .err()
            .expect("opening a missing device must fail");
        assert!(matches!(err, KvmError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"));
    }
}
