//! A running VM: KVM VM with in-kernel irqchip and PIT, guest RAM in memory
//! slots, the booted guest, its devices and one thread per vCPU. The owner
//! receives console lines and stop reasons as events, and can pause, resume
//! and stop every vCPU.

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::serial::{ConsoleSerial, IrqLine, LineSink};
use crate::devices::IoBus;
pub use crate::events::{ConsoleLine, StopReason, VmEvent};
use crate::kvm::{KvmError, KvmHost};
use crate::layout;
use crate::memory::{GuestMemory, GuestRam, MemoryError};
use crate::vcpu::gate::{RunGate, Want};
use crate::vcpu::{self, kick, setup, SharedVcpu};

/// COM1's interrupt line.
const COM1_GSI: u32 = 4;
/// How long a pause may take before we call the VM stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("{what} failed: {source}")]
    Kvm2 {
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm2 { what, source }
}

// Field order is drop order: vCPU threads and fds go before the VM fd, and
// the VM before the memory its slots point into.
pub struct Vm {
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<SharedVcpu>,
    gate: Arc<RunGate>,
    _vm_fd: VmFd,
    ram: GuestRam,
    _host: KvmHost,
    config: VmConfig,
    events: Option<Receiver<VmEvent>>,
    tsc_khz: u32,
    started_at: Instant,
}

impl Vm {
    /// Creates the VM, boots the guest and starts every vCPU. Nothing is
    /// left behind on error: all resources are owned and dropped.
    pub fn start(config: VmConfig) -> Result<Self, VmError> {
        let started_at = Instant::now();
        let host = KvmHost::open()?;
        config.validate(&host)?;
        let ram = GuestRam::new(config.mem_bytes, config.prealloc)?;

        let vm_fd = host.kvm().create_vm().map_err(KvmError::CreateVm)?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, (guest, len, host_addr)) in ram.regions().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: guest.0,
                memory_size: len,
                userspace_addr: host_addr,
            };
            // SAFETY: the region maps memory owned by `ram`, which lives in
            // this Vm and outlives the VM fd (fields drop in order, and the
            // VM fd is closed before `ram` is unmapped).
            unsafe { vm_fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let cpuid = host.supported_cpuid()?;
        let vcpu_fds = (0..config.vcpus)
            .map(|i| {
                vm_fd
                    .create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tsc_khz = vcpu_fds[0]
            .get_tsc_khz()
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))?;

        // The guest learns the TSC frequency from us: calibrating against the
        // PIT costs it tens of milliseconds of exits.
        let cmdline = format!("{} tsc_khz={tsc_khz}", config.cmdline)
            .trim()
            .to_string();
        let entry = boot::load(ram.memory(), config.mem_bytes, &config.image, &cmdline)?;
        for (i, fd) in vcpu_fds.iter().enumerate() {
            setup::configure(fd, i as u32, entry, &cpuid)?;
        }

        let (events_tx, events_rx) = channel();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Io {
            what: "eventfd for COM1",
            source,
        })?;
        vm_fd
            .register_irqfd(&irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        let serial = ConsoleSerial::new(IrqLine(irq), LineSink::new(events_tx.clone()));
        let bus = Arc::new(IoBus::new(serial));

        kick::install_handler().map_err(VmError::KickHandler)?;
        let gate = Arc::new(RunGate::new(vcpu_fds.len(), Want::Run));
        let vcpus: Vec<SharedVcpu> = vcpu_fds
            .into_iter()
            .map(|fd| Arc::new(Mutex::new(fd)))
            .collect();
        let mut vm = Self {
            config,
            _host: host,
            _vm_fd: vm_fd,
            ram,
            vcpus,
            threads: Vec::new(),
            gate,
            events: Some(events_rx),
            tsc_khz,
            started_at,
        };
        for (i, vcpu) in vm.vcpus.iter().enumerate() {
            let handle = vcpu::spawn(
                i as u32,
                vcpu.clone(),
                vm.gate.clone(),
                bus.clone(),
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

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// When `start` was called.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// The vCPUs, for reading or writing their state while paused.
    pub fn vcpus(&self) -> &[SharedVcpu] {
        &self.vcpus
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
