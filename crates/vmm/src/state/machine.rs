//! VM-wide KVM state: the in-kernel PIC pair and IOAPIC, the PIT, and the
//! KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct MachineStateError {
    what: &'static str,
    source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineStateError {
    move |source| MachineStateError { what, source }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, MachineStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(err(what))?;
    Ok(c)
}

impl MachineState {
    pub fn save(vm: &VmFd) -> Result<Self, MachineStateError> {
        let mut clock = vm.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        // Only the clock value travels; flags describe this host's view.
        clock.flags = 0;
        Ok(Self {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), MachineStateError> {
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(err("KVM_SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(err("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(err("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(err("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}
