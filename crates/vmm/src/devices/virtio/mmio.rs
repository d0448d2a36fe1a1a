//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! file a driver sees in one 0x200-byte slot, the queue configuration it
//! writes there, and the status state machine that activates and resets
//! the device behind it.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, status, Activation, DeviceSignals, QueueRecord, VirtioDevice};
use crate::devices::mmio_bus::MmioDevice;
use crate::memory::GuestMemory;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "FRRY": any value is allowed; drivers do not check it.
const VENDOR_ID: u32 = 0x5952_5246;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Where QueueNotify sits inside a slot, for KVM ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// The transport's part of the state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot make the queue notification eventfds: {0}")]
    EventFd(std::io::Error),
    #[error("saved device state has {saved} queues, this device has {built}")]
    QueueCount { saved: usize, built: usize },
    #[error("saved queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error(
        "saved device state acks features {acked:#x} the device does not offer ({offered:#x})"
    )]
    Features { acked: u64, offered: u64 },
    #[error(transparent)]
    Activate(#[from] super::ActivateError),
}

struct Inner<D> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
}

/// One device in one virtio-mmio slot.
pub struct MmioTransport<D: VirtioDevice> {
    inner: Mutex<Inner<D>>,
    memory: GuestMemory,
    signals: Arc<DeviceSignals>,
    notifiers: Vec<EventFd>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, reset, as no driver has touched it yet.
    pub fn new(device: D, memory: GuestMemory) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("devices offer valid queue sizes"))
            .collect::<Vec<_>>();
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                device,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                acked_features: 0,
                queue_sel: 0,
                queues,
                config_generation: 0,
                activated: false,
            }),
            memory,
            signals: Arc::new(DeviceSignals::default()),
            notifiers,
        })
    }

    /// Puts back a transport saved by [`save`](Self::save) around `device`
    /// (already restored to its own state); a device that was running is
    /// activated again, so the driver continues without a reset.
    pub fn restore(
        device: D,
        memory: GuestMemory,
        state: &TransportState,
    ) -> Result<Self, TransportError> {
        let this = Self::new(device, memory)?;
        {
            let mut inner = this.inner.lock().unwrap();
            let built = inner.queues.len();
            if state.queues.len() != built {
                return Err(TransportError::QueueCount {
                    saved: state.queues.len(),
                    built,
                });
            }
            let offered = inner.device.features();
            if state.acked_features & !offered != 0 {
                return Err(TransportError::Features {
                    acked: state.acked_features,
                    offered,
                });
            }
            for (index, (saved, queue)) in state.queues.iter().zip(&mut inner.queues).enumerate() {
                if saved.max_size != queue.max_size() {
                    return Err(TransportError::Queue {
                        index,
                        reason: format!(
                            "its largest size is {}, this device offers {}",
                            saved.max_size,
                            queue.max_size()
                        ),
                    });
                }
                *queue = Queue::try_from(QueueState::from(*saved)).map_err(|e| {
                    TransportError::Queue {
                        index,
                        reason: e.to_string(),
                    }
                })?;
                if queue.ready() && !queue.is_valid(&this.memory) {
                    return Err(TransportError::Queue {
                        index,
                        reason: "its rings are not inside guest memory".into(),
                    });
                }
            }
            inner.status = state.status;
            inner.device_features_sel = state.device_features_sel;
            inner.driver_features_sel = state.driver_features_sel;
            inner.acked_features = state.acked_features;
            inner.queue_sel = state.queue_sel;
            inner.config_generation = state.config_generation;
            this.signals
                .restore(state.interrupt_status, state.needs_reset);
            if state.status & status::DRIVER_OK != 0 {
                this.activate(&mut inner)?;
            }
        }
        Ok(this)
    }

    /// (offset inside the slot, datamatch, eventfd) for each queue: what
    /// KVM_IOEVENTFD needs so a notification wakes the device directly.
    pub fn notifiers(&self) -> impl Iterator<Item = (u64, u32, &EventFd)> {
        self.notifiers
            .iter()
            .enumerate()
            .map(|(i, fd)| (QUEUE_NOTIFY_OFFSET, i as u32, fd))
    }

    pub fn signals(&self) -> &Arc<DeviceSignals> {
        &self.signals
    }

    /// The device itself, locked (for its owner's controls).
    pub fn device(&self) -> DeviceGuard<'_, D> {
        DeviceGuard(self.inner.lock().unwrap())
    }

    /// Stops the device touching guest memory (see `VirtioDevice::pause`).
    pub fn pause(&self) {
        self.inner.lock().unwrap().device.pause();
    }

    pub fn resume(&self) {
        self.inner.lock().unwrap().device.resume();
    }

    /// The transport's state and the device's; the device must be paused.
    pub fn save(&self) -> (TransportState, D::State) {
        let inner = self.inner.lock().unwrap();
        let live = if inner.activated {
            inner.device.queue_states()
        } else {
            None
        };
        let queues = match live {
            Some(states) => states.into_iter().map(QueueRecord::from).collect(),
            None => inner
                .queues
                .iter()
                .map(|q| QueueRecord::from(q.state()))
                .collect(),
        };
        let state = TransportState {
            status: inner.status,
            device_features_sel: inner.device_features_sel,
            driver_features_sel: inner.driver_features_sel,
            acked_features: inner.acked_features,
            queue_sel: inner.queue_sel,
            config_generation: inner.config_generation,
            interrupt_status: self.signals.interrupt_status(),
            needs_reset: self.signals.is_broken(),
            queues,
        };
        (state, inner.device.save())
    }

    fn activate(&self, inner: &mut Inner<D>) -> Result<(), TransportError> {
        let notifiers = self
            .notifiers
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let queues = inner
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| super::ActivateError::Queues(e.to_string()))?;
        let activation = Activation {
            memory: self.memory.clone(),
            queues,
            notifiers,
            acked_features: inner.acked_features,
            signals: self.signals.clone(),
        };
        inner.device.activate(activation)?;
        inner.activated = true;
        Ok(())
    }

    fn reset(&self, inner: &mut Inner<D>) {
        if inner.activated {
            inner.device.reset();
            inner.activated = false;
        }
        for q in &mut inner.queues {
            q.reset();
        }
        inner.status = 0;
        inner.device_features_sel = 0;
        inner.driver_features_sel = 0;
        inner.acked_features = 0;
        inner.queue_sel = 0;
        self.signals.clear();
    }

    fn write_status(&self, inner: &mut Inner<D>, value: u32) {
        if value == 0 {
            self.reset(inner);
            return;
        }
        let old = inner.status;
        // The driver may only add bits (virtio 1.2, 2.1.1), FAILED aside.
        if value & old != old && value & status::FAILED == 0 {
            tracing::warn!("virtio driver cleared status bits ({old:#x} -> {value:#x}); ignored");
            return;
        }
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = inner.device.features();
            let acked = inner.acked_features;
            if acked & !offered != 0 || acked & features::VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver we refuse.
                tracing::warn!(
                    "virtio driver acked features {acked:#x} outside {offered:#x} or without VERSION_1"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                new |= status::FAILED;
            } else {
                let ready_ok = inner
                    .queues
                    .iter()
                    .all(|q| !q.ready() || q.is_valid(&self.memory));
                if !ready_ok {
                    self.signals
                        .mark_broken("a ready queue lies outside guest memory");
                } else if let Err(e) = self.activate(inner) {
                    tracing::warn!("virtio device did not start: {e}");
                    self.signals.mark_broken("the device could not start");
                }
            }
        }
        inner.status = new;
    }

    fn queue_write(&self, inner: &mut Inner<D>, offset: u64, value: u32) {
        // Queue registers are the driver's only before DRIVER_OK.
        if inner.status & status::DRIVER_OK != 0 {
            return;
        }
        let Some(q) = inner.queues.get_mut(inner.queue_sel as usize) else {
            return;
        };
        match offset {
            reg::QUEUE_NUM => q.set_size(value as u16),
            reg::QUEUE_READY => q.set_ready(value == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn read_register(&self, inner: &Inner<D>, offset: u64) -> u32 {
        let queue = inner.queues.get(inner.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => inner.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match inner.device_features_sel {
                0 => inner.device.features() as u32,
                1 => (inner.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.signals.interrupt_status(),
            reg::STATUS => {
                let broken = if self.signals.is_broken() {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                inner.status | broken
            }
            // No shared memory regions: their length reads as -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => inner.config_generation,
            _ => 0,
        }
    }

    fn write_register(&self, inner: &mut Inner<D>, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => inner.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => inner.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if inner.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match inner.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                inner.acked_features = (inner.acked_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            reg::QUEUE_SEL => inner.queue_sel = value,
            reg::QUEUE_NOTIFY => {
                // Only without an ioeventfd (or before KVM took it): pass
                // the notification on as KVM would have.
                if let Some(fd) = self.notifiers.get(value as usize) {
                    let _ = fd.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.signals.ack(value),
            reg::STATUS => self.write_status(inner, value),
            o @ (reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH) => self.queue_write(inner, o, value),
            _ => {}
        }
    }
}

/// The device behind a transport, locked.
pub struct DeviceGuard<'a, D: VirtioDevice>(MutexGuard<'a, Inner<D>>);

impl<D: VirtioDevice> std::ops::Deref for DeviceGuard<'_, D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.0.device
    }
}

impl<D: VirtioDevice> std::ops::DerefMut for DeviceGuard<'_, D> {
    fn deref_mut(&mut self) -> &mut D {
        &mut self.0.device
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let inner = self.inner.lock().unwrap();
        if offset >= reg::CONFIG {
            inner.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and aligned; anything else reads 0.
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(&inner, offset).to_le_bytes());
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        if offset >= reg::CONFIG {
            inner.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(&mut inner, offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
