//! Putting a virtio-mmio transport on the bus: its slot's window, and one
//! KVM ioeventfd per queue on QueueNotify (datamatch = the queue index),
//! so a notification wakes the device's worker inside the kernel instead
//! of returning to the vCPU thread.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::devices::mmio_bus::{slot_addr, MmioBus, MmioBusError, VIRTIO_MMIO_SLOT_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("virtio-mmio slot {slot}: {source}")]
    Bus { slot: u32, source: MmioBusError },
    #[error("KVM_IOEVENTFD for queue {queue} of virtio-mmio slot {slot} failed: {source}")]
    IoEvent {
        slot: u32,
        queue: u32,
        source: kvm_ioctls::Error,
    },
}

/// Registers `transport` in virtio-mmio slot `slot` of `bus`, with its
/// queue notifications wired to ioeventfds of `vm_fd`.
pub fn attach<D: VirtioDevice>(
    vm_fd: &VmFd,
    bus: &mut MmioBus,
    slot: u32,
    transport: Arc<MmioTransport<D>>,
) -> Result<(), AttachError> {
    let base = slot_addr(slot);
    for (offset, queue, fd) in transport.notifiers() {
        vm_fd
            .register_ioevent(fd, &IoEventAddress::Mmio(base + offset), queue)
            .map_err(|source| AttachError::IoEvent {
                slot,
                queue,
                source,
            })?;
    }
    bus.register(base, VIRTIO_MMIO_SLOT_SIZE, transport)
        .map_err(|source| AttachError::Bus { slot, source })
}
