//! The devices the guest reaches by port I/O and by MMIO, and the buses
//! that route a vCPU's I/O and MMIO exits to them.

pub mod block;
pub mod mmio_bus;
pub mod net;
pub mod serial;

pub mod virtio;

use std::sync::Mutex;

use crate::boot::{COM1_BASE, GUEST_EXIT_PORT};
use mmio_bus::MmioBus;
use serial::ConsoleSerial;

/// What a port write asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Continue,
    GuestExit(u8),
}

pub struct IoBus {
    serial: Mutex<ConsoleSerial>,
    mmio: MmioBus,
}

impl IoBus {
    pub fn new(serial: ConsoleSerial, mmio: MmioBus) -> Self {
        Self {
            serial: Mutex::new(serial),
            mmio,
        }
    }

    /// A KVM_EXIT_MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data)
    }

    /// A KVM_EXIT_MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data)
    }

    /// COM1's registers, for the state record.
    /// COM1's registers and the console line in progress.
    pub fn serial_state(&self) -> (vm_superio::serial::SerialState, Vec<u8>) {
        let serial = self.serial.lock().unwrap();
        (serial.state(), serial.writer().pending().to_vec())
    }

    /// A port write; `data` holds every byte of a `rep outs`.
    pub fn pio_out(&self, port: u16, data: &[u8]) -> PioOutcome {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let mut serial = self.serial.lock().unwrap();
                let offset = (p - COM1_BASE) as u8;
                for &b in data {
                    if let Err(e) = serial.write(offset, b) {
                        tracing::warn!("COM1 write failed: {e}");
                    }
                }
                PioOutcome::Continue
            }
            GUEST_EXIT_PORT => PioOutcome::GuestExit(data.first().copied().unwrap_or(0)),
            _ => PioOutcome::Continue,
        }
    }

    /// A port read; absent devices float high, as on real hardware.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let mut serial = self.serial.lock().unwrap();
                for b in data.iter_mut() {
                    *b = serial.read((p - COM1_BASE) as u8);
                }
            }
            _ => data.fill(0xff),
        }
    }
}
