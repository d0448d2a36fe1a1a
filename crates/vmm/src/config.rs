//! What a VM is made of, checked before anything is created.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::kvm::KvmHost;

/// The guest program to boot.
#[derive(Debug, Clone)]
pub enum GuestImage {
    File(PathBuf),
    Bytes(Cow<'static, [u8]>),
}

impl GuestImage {
    /// How errors name this image.
    pub fn describe(&self) -> String {
        match self {
            GuestImage::File(p) => format!("guest file {}", p.display()),
            GuestImage::Bytes(_) => "the built-in guest".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub image: GuestImage,
    /// The guest command line, as the guest reads it from its start_info.
    pub cmdline: String,
    /// Fault in all guest memory before the guest starts.
    pub prealloc: bool,
    /// A virtio-net card on a tap, in virtio-mmio slot 0.
    pub net: Option<crate::devices::net::NetConfig>,
    /// A virtio-blk disk on a raw image, in virtio-mmio slot 1.
    pub block: Option<crate::devices::block::device::BlockConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{asked} vCPUs asked, this host's KVM allows at most {max}")]
    TooManyVcpus { asked: u32, max: usize },
}

/// Checks a vCPU count against the host; memory is checked when it is made.
pub fn check_vcpus(vcpus: u32, host: &KvmHost) -> Result<(), ConfigError> {
    if vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if vcpus as usize > host.max_vcpus() {
        return Err(ConfigError::TooManyVcpus {
            asked: vcpus,
            max: host.max_vcpus(),
        });
    }
    Ok(())
}
