//! A running VM: KVM VM with in-kernel irqchip and PIT, guest RAM in memory
//! slots, its devices and one thread per vCPU. It is made in one of two
//! ways: booted fresh from a guest image, or restored from a state record
//! and memory. The owner receives console lines and stop reasons as events,
//! can pause, resume and stop every vCPU, and can save the full state.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::serial::{ConsoleSerial, IrqLine, LineSink};
use crate::devices::IoBus;
use crate::dirty::{DirtyError, DirtyPages};
pub use crate::events::{ConsoleLine, StopReason, VmEvent};
use crate::kvm::{KvmError, KvmHost};
use crate::layout;
use crate::memory::{GuestMemory, GuestRam, MemoryError};
use crate::state::{
    DeviceStates, MachineConfig, MachineState, MachineStateError, StateRecord, VcpuState,
    VcpuStateError,
};
use crate::vcpu::gate::{RunGate, Want};
use crate::vcpu::{self, kick, setup, SharedVcpu};

/// COM1's interrupt line.
const COM1_GSI: u32 = 4;
/// How long a pause may take before we call the VM stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The legacy KVM_GET_XSAVE buffer; larger XSAVE state needs XSAVE2.
const LEGACY_XSAVE_BYTES: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    VcpuSetup(#[from] setup::SetupError),
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    MachineState(#[from] MachineStateError),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error("the vCPUs did not all stop within {0:?}")]
    PauseTimeout(Duration),
    #[error("the VM must be paused to {0}")]
    NotPaused(&'static str),
    #[error(
        "this host's XSAVE state is {0} bytes; Ferry saves only the 4096-byte legacy layout so far"
    )]
    XsaveTooLarge(i32),
    #[error("the saved VM ran with a TSC of {saved_khz} kHz; this host runs at {host_khz} kHz and cannot scale it: {source}")]
    TscMismatch {
        saved_khz: u32,
        host_khz: u32,
        source: kvm_ioctls::Error,
    },
    #[error("saved COM1 state is invalid: {0}")]
    SerialState(String),
    #[error("loading guest memory failed: {0}")]
    LoadMemory(Box<dyn std::error::Error + Send + Sync>),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// A VM made but not yet running: what boot and restore have in common.
struct Parts {
    host: KvmHost,
    vm_fd: VmFd,
    ram: GuestRam,
    vcpu_fds: Vec<VcpuFd>,
    tsc_khz: u32,
    msr_indices: Vec<u32>,
}

// Field order is drop order: vCPU threads and fds go before the VM fd, and
// the VM before the memory its slots point into.
pub struct Vm {
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<SharedVcpu>,
    gate: Arc<RunGate>,
    bus: Arc<IoBus>,
    vm_fd: VmFd,
    ram: GuestRam,
    _host: KvmHost,
    machine: MachineConfig,
    msr_indices: Vec<u32>,
    events: Option<Receiver<VmEvent>>,
    started_at: Instant,
}

impl Vm {
    /// Creates the VM, boots the guest and starts every vCPU. Nothing is
    /// left behind on error: all resources are owned and dropped.
    pub fn start(config: VmConfig) -> Result<Self, VmError> {
        let started_at = Instant::now();
        let parts = build(config.mem_bytes, config.vcpus, config.prealloc)?;
        // The guest learns the TSC frequency from us: calibrating against the
        // PIT costs it tens of milliseconds of exits.
        let cmdline = format!("{} tsc_khz={}", config.cmdline, parts.tsc_khz)
            .trim()
            .to_string();
        let entry = boot::load(
            parts.ram.memory(),
            config.mem_bytes,
            &config.image,
            &cmdline,
        )?;
        let cpuid = parts.host.supported_cpuid()?;
        for (i, fd) in parts.vcpu_fds.iter().enumerate() {
            setup::configure(fd, i as u32, entry, &cpuid)?;
        }
        let machine = machine_config(config.mem_bytes, config.vcpus, cmdline, parts.tsc_khz);
        Self::launch(parts, machine, None, started_at)
    }

    /// Rebuilds a VM from `record`: `load_memory` fills its (zeroed) RAM,
    /// then every piece of state is put back and the vCPUs start where they
    /// stopped. Nothing runs unless all of it succeeded.
    pub fn restore<E>(
        record: &StateRecord,
        prealloc: bool,
        load_memory: impl FnOnce(&GuestMemory) -> Result<(), E>,
    ) -> Result<Self, VmError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let started_at = Instant::now();
        let config = &record.config;
        let parts = build(config.mem_bytes, config.vcpus, prealloc)?;
        if parts.tsc_khz != config.tsc_khz {
            for fd in &parts.vcpu_fds {
                fd.set_tsc_khz(config.tsc_khz)
                    .map_err(|source| VmError::TscMismatch {
                        saved_khz: config.tsc_khz,
                        host_khz: parts.tsc_khz,
                        source,
                    })?;
            }
        }
        load_memory(parts.ram.memory()).map_err(|e| VmError::LoadMemory(Box::new(e)))?;
        record.machine.restore(&parts.vm_fd)?;
        for (state, fd) in record.vcpus.iter().zip(&parts.vcpu_fds) {
            state.restore(fd)?;
        }
        Self::launch(parts, config.clone(), Some(&record.devices), started_at)
    }

    /// Wires devices and starts one thread per vCPU.
    fn launch(
        parts: Parts,
        machine: MachineConfig,
        devices: Option<&DeviceStates>,
        started_at: Instant,
    ) -> Result<Self, VmError> {
        let (events_tx, events_rx) = channel();
        let bus = Arc::new(IoBus::new(make_serial(&parts.vm_fd, &events_tx, devices)?));
        kick::install_handler().map_err(VmError::KickHandler)?;
        let gate = Arc::new(RunGate::new(parts.vcpu_fds.len(), Want::Run));
        let vcpus: Vec<SharedVcpu> = parts
            .vcpu_fds
            .into_iter()
            .map(|fd| Arc::new(Mutex::new(fd)))
            .collect();
        let mut vm = Self {
            threads: Vec::new(),
            vcpus,
            gate,
            bus,
            vm_fd: parts.vm_fd,
            ram: parts.ram,
            _host: parts.host,
            machine,
            msr_indices: parts.msr_indices,
            events: Some(events_rx),
            started_at,
        };
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let handle = vcpu::spawn(
                i as u32,
                vcpu.clone(),
                vm.gate.clone(),
                vm.bus.clone(),
                events_tx.clone(),
            )
            .map_err(|source| VmError::Io {
                what: "spawning a vCPU thread",
                source,
            })?;
            vm.threads.push(handle);
        }
        Ok(vm)
    }

    /// The stream of console lines and stop reasons; can be taken once.
    pub fn take_events(&mut self) -> Option<Receiver<VmEvent>> {
        self.events.take()
    }

    /// The VM's shape, as a destination or a restore must rebuild it.
    pub fn machine(&self) -> &MachineConfig {
        &self.machine
    }

    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn tsc_khz(&self) -> u32 {
        self.machine.tsc_khz
    }

    /// When `start` or `restore` was called.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Stops every vCPU outside KVM_RUN; returns once all have stopped.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let t0 = Instant::now();
        self.gate.set(Want::Pause);
        self.kick_all();
        if !self.gate.wait_all_stopped(PAUSE_TIMEOUT) {
            return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        Ok(t0.elapsed())
    }

    pub fn resume(&self) {
        self.gate.set(Want::Run);
    }

    /// The complete state but memory. The VM must be paused.
    pub fn save_state(&self) -> Result<StateRecord, VmError> {
        if self.gate.wanted() != Want::Pause {
            return Err(VmError::NotPaused("save its state"));
        }
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, vcpu)| {
                // A parked vCPU thread has released its lock.
                let fd = vcpu.lock().unwrap();
                VcpuState::save(&fd, i as u32, &self.msr_indices)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (serial, console_pending) = self.bus.serial_state();
        Ok(StateRecord {
            config: self.machine.clone(),
            vcpus,
            machine: MachineState::save(&self.vm_fd)?,
            devices: DeviceStates {
                serial: serial.into(),
                console_pending,
            },
        })
    }

    /// Starts or stops tracking which pages the guest and the VMM write.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), DirtyError> {
        crate::dirty::set_logging(&self.vm_fd, &self.ram, on)
    }

    /// Every page written since the previous harvest (or since logging was
    /// turned on); clears the record.
    pub fn harvest_dirty(&self) -> Result<DirtyPages, DirtyError> {
        crate::dirty::harvest(&self.vm_fd, &self.ram)
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn stop(&mut self) {
        self.gate.set(Want::Stop);
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // A thread that already exited cannot be kicked and needs no kick.
            let _ = t.kill(kick::kick_signal());
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn machine_config(mem_bytes: u64, vcpus: u32, cmdline: String, tsc_khz: u32) -> MachineConfig {
    MachineConfig {
        mem_bytes,
        vcpus,
        cmdline,
        ram_ranges: layout::ram_ranges(mem_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l))
            .collect(),
        tsc_khz,
    }
}

/// Opens KVM and makes a VM with RAM, irqchip, PIT and vCPUs, not running.
fn build(mem_bytes: u64, vcpus: u32, prealloc: bool) -> Result<Parts, VmError> {
    let host = KvmHost::open()?;
    crate::config::check_vcpus(vcpus, &host)?;
    let ram = GuestRam::new(mem_bytes, prealloc)?;
    let vm_fd = host.kvm().create_vm().map_err(KvmError::CreateVm)?;
    let xsave_bytes = vm_fd.check_extension_int(Cap::Xsave2);
    if xsave_bytes > LEGACY_XSAVE_BYTES {
        return Err(VmError::XsaveTooLarge(xsave_bytes));
    }
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDR)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(ioctl("KVM_CREATE_PIT2"))?;
    for (slot, (guest, len, host_addr)) in ram.regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: guest.0,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: the region maps memory owned by `ram`, which the Vm keeps
        // until after the VM fd (and every vCPU fd) is closed.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    let vcpu_fds = (0..vcpus)
        .map(|i| {
            vm_fd
                .create_vcpu(u64::from(i))
                .map_err(ioctl("KVM_CREATE_VCPU"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tsc_khz = vcpu_fds[0]
        .get_tsc_khz()
        .map_err(ioctl("KVM_GET_TSC_KHZ"))?;
    let msr_indices = host
        .kvm()
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    Ok(Parts {
        host,
        vm_fd,
        ram,
        vcpu_fds,
        tsc_khz,
        msr_indices,
    })
}

fn make_serial(
    vm_fd: &VmFd,
    events: &Sender<VmEvent>,
    saved: Option<&DeviceStates>,
) -> Result<ConsoleSerial, VmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Io {
        what: "eventfd for COM1",
        source,
    })?;
    vm_fd
        .register_irqfd(&irq, COM1_GSI)
        .map_err(ioctl("KVM_IRQFD for COM1"))?;
    let sink = LineSink::with_pending(
        events.clone(),
        saved.map_or(&[][..], |d| &d.console_pending),
    );
    match saved {
        None => Ok(ConsoleSerial::new(IrqLine(irq), sink)),
        Some(d) => ConsoleSerial::from_state(&(&d.serial).into(), IrqLine(irq), NoEvents, sink)
            .map_err(|e| VmError::SerialState(format!("{e:?}"))),
    }
}
