//! The state record: everything needed to continue a VM elsewhere except
//! its memory, which travels beside it (to a file in a snapshot, over a
//! stream in pre-copy, on demand in post-copy). One record serves all three.

pub mod codec;
pub mod machine;
pub mod vcpu;

use serde::{Deserialize, Serialize};

use codec::{CodecError, SectionId};
pub use machine::{MachineState, MachineStateError};
pub use vcpu::{VcpuState, VcpuStateError};

/// The VM's shape: a destination must build exactly this before loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub cmdline: String,
    /// (guest-physical start, length) of every RAM range.
    pub ram_ranges: Vec<(u64, u64)>,
    pub tsc_khz: u32,
}

/// COM1's registers (vm-superio's SerialState, in a form we version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegisters {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for vm_superio::serial::SerialState {
    fn from(s: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialRegisters,
    /// Console bytes of a line the guest had not finished when paused.
    pub console_pending: Vec<u8>,
}

/// The network card's section: its transport (negotiated features, queue
/// addresses, sizes and positions, status) and its own state (MAC, the
/// guest address it learnt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSection {
    pub transport: crate::devices::virtio::mmio::TransportState,
    pub device: crate::devices::net::NetState,
}

/// The disk's section: its transport and what the image must be (size,
/// mode) for the VM to continue on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSection {
    pub transport: crate::devices::virtio::mmio::TransportState,
    pub device: crate::devices::block::device::BlockState,
}

#[derive(Debug)]
pub struct StateRecord {
    pub config: MachineConfig,
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    pub devices: DeviceStates,
    /// Present only for a VM with a network card.
    pub net: Option<NetSection>,
    /// Present only for a VM with a disk.
    pub block: Option<BlockSection>,
}

const CONFIG: SectionId = SectionId {
    id: 1,
    name: "config",
    version: 1,
};
const VCPUS: SectionId = SectionId {
    id: 2,
    name: "vcpus",
    version: 1,
};
const MACHINE: SectionId = SectionId {
    id: 3,
    name: "machine",
    version: 1,
};
const DEVICES: SectionId = SectionId {
    id: 4,
    name: "devices",
    version: 1,
};
const NET: SectionId = SectionId {
    id: 5,
    name: "virtio-net",
    version: 1,
};
const BLOCK: SectionId = SectionId {
    id: 6,
    name: "virtio-blk",
    version: 1,
};
const KNOWN: &[SectionId] = &[CONFIG, VCPUS, MACHINE, DEVICES, NET, BLOCK];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("state record is inconsistent: {0}")]
    Inconsistent(String),
}

/// A section only some VMs have.
fn optional<T: serde::de::DeserializeOwned>(
    sections: &[codec::RawSection<'_>],
    id: SectionId,
) -> Result<Option<T>, CodecError> {
    if sections.iter().any(|s| s.id == id.id) {
        codec::take(sections, id).map(Some)
    } else {
        Ok(None)
    }
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = codec::Writer::new();
        w.section(CONFIG, &self.config);
        w.section(VCPUS, &self.vcpus);
        w.section(MACHINE, &self.machine);
        w.section(DEVICES, &self.devices);
        if let Some(net) = &self.net {
            w.section(NET, net);
        }
        if let Some(block) = &self.block {
            w.section(BLOCK, block);
        }
        w.finish()
    }

    /// Decodes and checks a record; nothing in it is trusted until this
    /// returns Ok.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let sections = codec::read_sections(bytes)?;
        codec::reject_unknown(&sections, KNOWN)?;
        let record = Self {
            config: codec::take(&sections, CONFIG)?,
            vcpus: codec::take(&sections, VCPUS)?,
            machine: codec::take(&sections, MACHINE)?,
            devices: codec::take(&sections, DEVICES)?,
            net: optional(&sections, NET)?,
            block: optional(&sections, BLOCK)?,
        };
        record.check()?;
        Ok(record)
    }

    fn check(&self) -> Result<(), StateError> {
        let c = &self.config;
        if c.vcpus as usize != self.vcpus.len() {
            return Err(StateError::Inconsistent(format!(
                "config says {} vCPUs, {} are saved",
                c.vcpus,
                self.vcpus.len()
            )));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| v.index as usize != *i)
        {
            return Err(StateError::Inconsistent(format!(
                "vCPU slot {i} holds vCPU {}",
                v.index
            )));
        }
        let expected: Vec<(u64, u64)> = crate::layout::ram_ranges(c.mem_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l))
            .collect();
        if c.ram_ranges != expected {
            return Err(StateError::Inconsistent(format!(
                "RAM ranges {:x?} do not match {} bytes of memory",
                c.ram_ranges, c.mem_bytes
            )));
        }
        Ok(())
    }
}
