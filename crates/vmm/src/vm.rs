//! A running VM: KVM VM with in-kernel irqchip and PIT, guest RAM in memory
//! slots, its devices and one thread per vCPU. It is made in one of two
//! ways: booted fresh from a guest image, or restored from a state record
//! and memory. The owner receives console lines and stop reasons as events,
//! can pause, resume and stop every vCPU, and can save the full state.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::block::copy_source::DiskCopySource;
use crate::devices::block::device::{Block, BlockConfig, BlockStats};
use crate::devices::block::image::ImageError;
use crate::devices::mmio_bus::{MmioBus, BLOCK_SLOT, NET_SLOT};
use crate::devices::net::{Net, NetConfig, NetError, NetHandle};
use crate::devices::serial::{ConsoleSerial, IrqLine, LineSink};
use crate::devices::virtio::attach::{attach, AttachError};
use crate::devices::virtio::mmio::{MmioTransport, TransportError};
use crate::devices::IoBus;
use crate::dirty::{DirtyError, DirtyPages};
pub use crate::events::{ConsoleLine, StopReason, VmEvent};
use crate::kvm::{KvmError, KvmHost};
use crate::layout;
use crate::lazy::{LazyError, LazyRam};
use crate::memory::{GuestMemory, GuestRam, MemoryError};
use crate::state::{
    BlockSection, DeviceStates, MachineConfig, MachineState, MachineStateError, NetSection,
    StateRecord, VcpuState, VcpuStateError,
};
use crate::vcpu::gate::{RunGate, Want};
use crate::vcpu::throttle::Throttle;
use crate::vcpu::{self, kick, setup, SharedVcpu};

/// COM1's interrupt line.
const COM1_GSI: u32 = 4;
/// How long a pause may take before we call the VM stuck.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for the vCPU threads to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
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
    #[error("the state record describes {what} {saved}, but this VM was built with {built}")]
    ShapeMismatch {
        what: &'static str,
        saved: String,
        built: String,
    },
    #[error("the state record holds {saved} vCPU states for a VM of {built} vCPUs")]
    VcpuCountMismatch { saved: usize, built: u32 },
    #[error("no state has been loaded into the incoming VM")]
    NothingLoaded,
    #[error(transparent)]
    Lazy(#[from] LazyError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the network card's transport: {0}")]
    NetTransport(#[from] TransportError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("the saved VM has a network card (MAC {mac}); give it a tap with --net tap=NAME")]
    NetMissing { mac: String },
    #[error("--disk: {0}")]
    Disk(#[from] ImageError),
    #[error("the saved VM has a disk ({bytes} bytes); give it its image with --disk path=IMG")]
    DiskMissing { bytes: u64 },
    #[error("the saved VM has no disk, but this VM was given one")]
    DiskUnexpected,
    #[error("the disk here does not match the saved VM's: {0}")]
    DiskMismatch(String),
    #[error("the disk's transport: {0}")]
    DiskTransport(TransportError),
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
    manual_dirty: bool,
}

/// What a pause measured: when it was asked for, and when the last vCPU
/// stopped running guest code (earlier than `requested` when the brake had
/// parked them all already). The blackout the guest sees starts at
/// `all_stopped`.
#[derive(Debug, Clone, Copy)]
pub struct Paused {
    pub requested: Instant,
    pub all_stopped: Instant,
}

impl Paused {
    /// How long stopping the vCPUs took (zero when they already were).
    pub fn stop_latency(&self) -> Duration {
        self.all_stopped.saturating_duration_since(self.requested)
    }
}

// Field order is drop order: vCPU threads and fds go before the VM fd, and
// the VM before the memory its slots point into.
pub struct Vm {
    throttle: Option<Throttle>,
    /// The network card; stopped after the vCPUs (declared after `threads`
    /// would not matter: `Drop` stops the vCPUs first).
    net: Option<Arc<MmioTransport<Net>>>,
    /// The disk (virtio-blk, slot 1); stopped like the card.
    block: Option<Arc<MmioTransport<Block>>>,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<SharedVcpu>,
    gate: Arc<RunGate>,
    bus: Arc<IoBus>,
    vm_fd: VmFd,
    ram: GuestRam,
    _host: KvmHost,
    machine: MachineConfig,
    msr_indices: Vec<u32>,
    cpuid: Vec<kvm_cpuid_entry2>,
    /// Dirty pages are re-protected by us, in small chunks.
    manual_dirty: bool,
    events: Option<Receiver<VmEvent>>,
    started_at: Instant,
    /// Post-copy's userfaultfd, kept open until the vCPUs are stopped
    /// (`Drop` stops them before any field goes): closing it while a vCPU
    /// runs would turn every page still missing into a zero page under the
    /// guest's feet.
    lazy: Option<Arc<LazyRam>>,
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
        let cpuid = cpuid.as_slice().to_vec();
        let net = config.net.as_ref().map(Net::new).transpose()?;
        let block = config.block.as_ref().map(Block::new).transpose()?;
        Self::launch(parts, machine, cpuid, None, (net, false), block, started_at)
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
        Self::restore_with_devices(record, prealloc, None, None, load_memory)
    }

    /// [`restore`](Self::restore) with the network card plugged into the
    /// tap `net` names and the disk on the image `block` names (which must
    /// be what the VM's disk held when it was saved: the record carries
    /// the device, not the image).
    pub fn restore_with_devices<E>(
        record: &StateRecord,
        prealloc: bool,
        net: Option<NetConfig>,
        block: Option<&BlockConfig>,
        load_memory: impl FnOnce(&GuestMemory) -> Result<(), E>,
    ) -> Result<Self, VmError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let config = &record.config;
        let mut incoming =
            IncomingVm::new(config.mem_bytes, config.vcpus, config.tsc_khz, prealloc)?;
        incoming.set_net(net)?;
        if let Some(block) = block {
            let bytes = record.block.as_ref().map(|b| b.device.sectors * 512);
            incoming.set_block(block, bytes.ok_or(VmError::DiskUnexpected)?)?;
        }
        load_memory(incoming.parts.ram.memory()).map_err(|e| VmError::LoadMemory(Box::new(e)))?;
        incoming.load_state(record)?;
        incoming.start()
    }

    /// Wires devices and starts one thread per vCPU.
    fn launch(
        parts: Parts,
        machine: MachineConfig,
        cpuid: Vec<kvm_cpuid_entry2>,
        devices: Option<SavedDevices<'_>>,
        (net_device, net_held): (Option<Net>, bool),
        block_device: Option<Block>,
        started_at: Instant,
    ) -> Result<Self, VmError> {
        let (events_tx, events_rx) = channel();
        let mut mmio = MmioBus::new();
        let saved_net = devices.and_then(|d| d.net);
        let net = match (net_device, saved_net) {
            (None, None) => None,
            (None, Some(saved)) => {
                return Err(VmError::NetMissing {
                    mac: ferry_netlab::MacAddr(saved.device.mac).to_string(),
                })
            }
            (Some(dev), None) => Some(Arc::new(MmioTransport::new(
                dev,
                parts.ram.memory().clone(),
            )?)),
            (Some(mut dev), Some(saved)) => {
                dev.apply_state(&saved.device);
                Some(Arc::new(MmioTransport::restore(
                    dev,
                    parts.ram.memory().clone(),
                    &saved.transport,
                )?))
            }
        };
        if let Some(t) = &net {
            if net_held {
                t.device().handle().hold();
            }
            attach(&parts.vm_fd, &mut mmio, NET_SLOT, t.clone())?;
        }
        let block = match (block_device, devices.and_then(|d| d.block)) {
            (None, None) => None,
            (None, Some(saved)) => {
                return Err(VmError::DiskMissing {
                    bytes: saved.device.sectors * 512,
                })
            }
            (Some(dev), None) => Some(Arc::new(
                MmioTransport::new(dev, parts.ram.memory().clone())
                    .map_err(VmError::DiskTransport)?,
            )),
            (Some(dev), Some(saved)) => {
                dev.check_saved(&saved.device)
                    .map_err(VmError::DiskMismatch)?;
                Some(Arc::new(
                    MmioTransport::restore(dev, parts.ram.memory().clone(), &saved.transport)
                        .map_err(VmError::DiskTransport)?,
                ))
            }
        };
        if let Some(t) = &block {
            attach(&parts.vm_fd, &mut mmio, BLOCK_SLOT, t.clone())?;
        }
        let bus = Arc::new(IoBus::new(
            make_serial(&parts.vm_fd, &events_tx, devices.map(|d| d.serial))?,
            mmio,
        ));
        kick::install_handler().map_err(VmError::KickHandler)?;
        let gate = Arc::new(RunGate::new(parts.vcpu_fds.len(), Want::Run));
        let vcpus: Vec<SharedVcpu> = parts
            .vcpu_fds
            .into_iter()
            .map(|fd| Arc::new(Mutex::new(fd)))
            .collect();
        let mut vm = Self {
            throttle: None,
            net,
            block,
            threads: Vec::new(),
            vcpus,
            gate,
            bus,
            vm_fd: parts.vm_fd,
            ram: parts.ram,
            _host: parts.host,
            machine,
            msr_indices: parts.msr_indices,
            cpuid,
            manual_dirty: parts.manual_dirty,
            events: Some(events_rx),
            started_at,
            lazy: None,
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

    /// The CPUID every vCPU runs with: what a destination must offer.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// Parks every vCPU for `percent` of each short period (0 = full
    /// speed): auto-converge's brake on a guest that outruns the link.
    pub fn set_throttle(&mut self, percent: u32) -> Result<(), VmError> {
        if percent == 0 {
            self.throttle = None;
            return Ok(());
        }
        if let Some(t) = &self.throttle {
            t.set(percent);
            return Ok(());
        }
        use std::os::unix::thread::JoinHandleExt;
        let ids = self.threads.iter().map(|t| t.as_pthread_t()).collect();
        let throttle =
            Throttle::start(self.gate.clone(), ids, percent).map_err(|source| VmError::Io {
                what: "spawning the throttle thread",
                source,
            })?;
        self.throttle = Some(throttle);
        Ok(())
    }

    /// The brake in force, in percent of time parked.
    pub fn throttle_percent(&self) -> u32 {
        self.throttle.as_ref().map_or(0, Throttle::percent)
    }

    /// Stops every vCPU outside KVM_RUN; returns once all have stopped,
    /// with when they did. vCPUs the brake holds parked are stopped
    /// already, so the pause does not wait for the brake: it is released
    /// only afterwards, when it no longer decides anything.
    pub fn pause(&mut self) -> Result<Paused, VmError> {
        let requested = Instant::now();
        self.gate.set(Want::Pause);
        self.kick_all();
        let stopped = self.gate.wait_all_stopped(PAUSE_TIMEOUT);
        self.throttle = None;
        let all_stopped = stopped.ok_or(VmError::PauseTimeout(PAUSE_TIMEOUT))?;
        // With the vCPUs stopped, the card stops writing guest memory too,
        // so what is saved (or copied) now stays true.
        if let Some(net) = &self.net {
            net.pause();
        }
        if let Some(block) = &self.block {
            block.pause();
        }
        Ok(Paused {
            requested,
            all_stopped,
        })
    }

    pub fn resume(&self) {
        if let Some(block) = &self.block {
            block.resume();
        }
        if let Some(net) = &self.net {
            net.resume();
        }
        self.gate.set(Want::Run);
    }

    /// The network card's controls, if the VM has one.
    pub fn net(&self) -> Option<NetHandle> {
        self.net.as_ref().map(|t| t.device().handle())
    }

    /// When a vCPU first entered the guest since the VM last started or
    /// resumed; waits up to `timeout` for it.
    pub fn first_run_since_resume(&self, timeout: Duration) -> Option<Instant> {
        self.gate.wait_running(timeout)
    }

    /// The disk's request counters, if the VM has one.
    pub fn disk_stats(&self) -> Option<Arc<BlockStats>> {
        self.block.as_ref().map(|t| t.device().stats.clone())
    }

    /// The disk, if the VM has one: its image's path, size in bytes and
    /// whether it is read-only.
    pub fn disk(&self) -> Option<(std::path::PathBuf, u64, bool)> {
        self.block.as_ref().map(|t| {
            let d = t.device();
            (d.path().to_owned(), d.size_bytes(), d.readonly())
        })
    }

    /// Paused: every write the disk took is on the storage (fdatasync).
    pub fn flush_disk(&self) -> Result<(), VmError> {
        if self.gate.controller_wants() != Want::Pause {
            return Err(VmError::NotPaused("flush its disk"));
        }
        match &self.block {
            Some(t) => Ok(t.device().flush()?),
            None => Ok(()),
        }
    }

    /// Paused, for a move: the disk's last requests are done; makes them
    /// visible to the destination and gives up the image's lock (see
    /// `Block::release_for_handover`). Whether the VM has a disk.
    pub fn release_disk(&self) -> Result<bool, VmError> {
        if self.gate.controller_wants() != Want::Pause {
            return Err(VmError::NotPaused("hand its disk over"));
        }
        match &self.block {
            Some(t) => {
                let flushed = t.device().release_for_handover()?;
                tracing::debug!(flushed, "disk handed over");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// After a move was abandoned: takes the image's lock back before the
    /// VM may write again, waiting up to `patience` for a destination that
    /// is still letting go of it. Err: someone else holds it, and the VM
    /// must stay paused (two writers would corrupt the disk).
    pub fn retake_disk(&self, patience: Duration) -> Result<(), VmError> {
        let Some(t) = &self.block else { return Ok(()) };
        let deadline = Instant::now() + patience;
        loop {
            match t.device().take_lock() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// A reader of the disk's image and of the blocks the guest writes,
    /// for a migration that copies the disk; None without a disk.
    pub fn disk_copy_source(&self) -> Option<Result<DiskCopySource, VmError>> {
        let t = self.block.as_ref()?;
        Some(t.device().copy_source().map_err(VmError::from))
    }

    /// The complete state but memory. The VM must be paused.
    pub fn save_state(&self) -> Result<StateRecord, VmError> {
        if self.gate.controller_wants() != Want::Pause {
            return Err(VmError::NotPaused("save its state"));
        }
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, vcpu)| {
                // A parked vCPU thread has released its lock.
                let fd = vcpu.lock().unwrap();
                let cpuid = setup::vcpu_cpuid(&self.cpuid, i as u32);
                VcpuState::save(&fd, i as u32, &self.msr_indices, cpuid)
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
            net: self.net.as_ref().map(|t| {
                let (transport, device) = t.save();
                NetSection { transport, device }
            }),
            block: self.block.as_ref().map(|t| {
                let (transport, device) = t.save();
                BlockSection { transport, device }
            }),
        })
    }

    /// Starts or stops tracking which pages the guest and the VMM write.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), DirtyError> {
        crate::dirty::set_logging(&self.vm_fd, &self.ram, on)
    }

    /// Every page written since the previous harvest (or since logging was
    /// turned on); clears the record.
    pub fn harvest_dirty(&self) -> Result<DirtyPages, DirtyError> {
        crate::dirty::harvest(&self.vm_fd, &self.ram, self.manual_dirty)
    }

    /// Stops and joins every vCPU thread. Idempotent.
    ///
    /// A vCPU waiting (inside the kernel) for a post-copy page that will
    /// never come cannot be stopped: a signal does not end that wait. Such
    /// a thread is left behind, and the userfaultfd it waits on is kept
    /// open for the life of the process, so that it never resumes on a
    /// zero page; the process exiting ends it.
    pub fn stop(&mut self) {
        self.throttle = None;
        self.gate.set(Want::Stop);
        self.kick_all();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut stuck = 0;
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            if let Some(lazy) = self.lazy.take() {
                std::mem::forget(lazy);
            }
            tracing::warn!(
                "{stuck} vCPU(s) wait on guest pages that will not arrive; left blocked until exit"
            );
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

/// A VM built to receive one that runs elsewhere: its memory and vCPUs
/// exist and pages can be written into it, but nothing runs until the
/// state is loaded and [`start`](Self::start) is called. Dropping it at
/// any point discards everything, which is what an aborted migration needs.
pub struct IncomingVm {
    parts: Parts,
    loaded: Option<Loaded>,
    /// The card, its tap open since `set_net`.
    net: Option<Net>,
    /// The disk, its image open since `set_block` (locked by `load_state`).
    block: Option<Block>,
    net_held: bool,
    /// The CPUID each vCPU was given by `preset_cpuid`, ahead of its state.
    preset_cpuid: Vec<Vec<kvm_cpuid_entry2>>,
}

impl IncomingVm {
    /// Builds KVM VM, memory and vCPUs for a guest of this shape; with
    /// `prealloc` every page of memory is faulted in now.
    pub fn new(mem_bytes: u64, vcpus: u32, tsc_khz: u32, prealloc: bool) -> Result<Self, VmError> {
        Self::with_ram(GuestRam::new(mem_bytes, prealloc)?, vcpus, tsc_khz)
    }

    /// Like [`new`](Self::new) with memory made beforehand (reserved, and
    /// perhaps preallocated, before the migration was even offered). It
    /// must be fresh: every byte still zero.
    pub fn with_ram(ram: GuestRam, vcpus: u32, tsc_khz: u32) -> Result<Self, VmError> {
        let parts = build_with(ram, vcpus)?;
        if parts.tsc_khz != tsc_khz {
            for fd in &parts.vcpu_fds {
                fd.set_tsc_khz(tsc_khz)
                    .map_err(|source| VmError::TscMismatch {
                        saved_khz: tsc_khz,
                        host_khz: parts.tsc_khz,
                        source,
                    })?;
            }
        }
        Ok(Self {
            parts,
            loaded: None,
            net: None,
            block: None,
            net_held: false,
            preset_cpuid: Vec::new(),
        })
    }

    /// Gives every vCPU the CPUID of a VM shown `base` (as a migration's
    /// offer carries it) now, before any state arrives: `load_state` then
    /// skips KVM_SET_CPUID2 for each vCPU whose saved CPUID is the same,
    /// which takes about 0.1 ms per vCPU out of the blackout here. A saved
    /// CPUID that differs is set as before.
    pub fn preset_cpuid(&mut self, base: &[kvm_cpuid_entry2]) -> Result<(), VmError> {
        let mut preset = Vec::with_capacity(self.parts.vcpu_fds.len());
        for (i, fd) in self.parts.vcpu_fds.iter().enumerate() {
            let entries = setup::vcpu_cpuid(base, i as u32);
            let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Ioctl {
                what: "KVM_SET_CPUID2 (too many CPUID entries)",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
            preset.push(entries);
        }
        self.preset_cpuid = preset;
        Ok(())
    }

    /// Opens the tap the network card plugs into when the VM starts: now,
    /// so that a missing or busy tap refuses the VM before any page moves
    /// and nobody can take the tap meanwhile.
    pub fn set_net(&mut self, net: Option<NetConfig>) -> Result<(), VmError> {
        self.net = net.as_ref().map(Net::new).transpose()?;
        Ok(())
    }

    /// Opens the image the VM's disk continues on (shared storage: the one
    /// the source runs on), which must be `bytes` long: now, so that a
    /// missing or wrong image refuses the VM before any page moves. Its
    /// lock is taken by `load_state`, once the source has given it up.
    pub fn set_block(&mut self, config: &BlockConfig, bytes: u64) -> Result<(), VmError> {
        self.block = Some(Block::new_unlocked(config, bytes)?);
        Ok(())
    }

    /// Starts the card held (see `NetHandle::hold`): frames from this
    /// host's tap wait until the frames forwarded from the VM's old place
    /// are in, so the guest gets them in order; `release` ends it.
    pub fn hold_net_at_start(&mut self) {
        self.net_held = true;
    }

    pub fn ram(&self) -> &GuestRam {
        &self.parts.ram
    }

    /// The guest memory at `gpa..gpa+len` for writing incoming pages, or
    /// None if that is not all inside one RAM region.
    pub fn memory_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let host = self.parts.ram.host_range(gpa, len)?;
        // SAFETY: `host_range` checked that the range lies inside one live
        // mapping owned by `self.parts.ram`; no vCPU has run (they are
        // started only by `start`, which consumes self) and the `&mut self`
        // borrow makes this the only reference into guest memory meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(host, len) })
    }

    /// All of guest RAM for writing incoming pages from several threads:
    /// one slice per RAM region, with its guest address.
    pub fn ram_mut(&mut self) -> Vec<(u64, &mut [u8])> {
        self.parts
            .ram
            .regions()
            .into_iter()
            .map(|(start, len, host)| {
                // SAFETY: each region is one live mapping of `len` bytes
                // owned by `self.parts.ram`, and regions never overlap, so
                // the slices are disjoint. No vCPU has run (only `start`,
                // which consumes self, starts them) and the `&mut self`
                // borrow makes these the only references into guest memory
                // for as long as they live.
                let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len as usize) };
                (start.0, mem)
            })
            .collect()
    }

    /// Puts every piece of saved state into the vCPUs and the VM; nothing
    /// runs yet. The record must describe a VM of exactly this shape.
    pub fn load_state(&mut self, record: &StateRecord) -> Result<(), VmError> {
        let config = &record.config;
        let built = machine_config(
            self.parts.ram.size(),
            self.parts.vcpu_fds.len() as u32,
            String::new(),
            config.tsc_khz,
        );
        if config.mem_bytes != built.mem_bytes || config.ram_ranges != built.ram_ranges {
            return Err(VmError::ShapeMismatch {
                what: "memory",
                saved: format!("{} bytes in {:x?}", config.mem_bytes, config.ram_ranges),
                built: format!("{} bytes in {:x?}", built.mem_bytes, built.ram_ranges),
            });
        }
        if record.vcpus.len() != self.parts.vcpu_fds.len() || config.vcpus != built.vcpus {
            return Err(VmError::VcpuCountMismatch {
                saved: record.vcpus.len(),
                built: built.vcpus,
            });
        }
        record.machine.restore(&self.parts.vm_fd)?;
        for (i, (state, fd)) in record.vcpus.iter().zip(&self.parts.vcpu_fds).enumerate() {
            let in_place = self.preset_cpuid.get(i) == Some(&state.cpuid);
            state.restore_with(fd, in_place)?;
        }
        let cpuid = record
            .vcpus
            .first()
            .map(|v| v.cpuid.clone())
            .unwrap_or_default();
        if let (Some(saved), None) = (&record.net, &self.net) {
            return Err(VmError::NetMissing {
                mac: ferry_netlab::MacAddr(saved.device.mac).to_string(),
            });
        }
        match (&record.block, &self.block) {
            (None, None) => {}
            (Some(saved), None) => {
                return Err(VmError::DiskMissing {
                    bytes: saved.device.sectors * 512,
                })
            }
            (None, Some(_)) => return Err(VmError::DiskUnexpected),
            (Some(saved), Some(block)) => {
                block
                    .check_saved(&saved.device)
                    .map_err(VmError::DiskMismatch)?;
                // Before the source is told the state is loaded, so that a
                // lock this side cannot take aborts the move while the
                // source can still take the disk back and resume.
                block.take_lock()?;
            }
        }
        self.loaded = Some(Loaded {
            machine: config.clone(),
            cpuid,
            serial: record.devices.clone(),
            net: record.net.clone(),
            block: record.block.clone(),
        });
        Ok(())
    }

    /// Starts the vCPUs with the pages in `missing` (guest address,
    /// length) still elsewhere: they are dropped here and every access to
    /// one waits, inside the kernel, until the returned [`LazyRam`] places
    /// it. Post-copy's start.
    pub fn start_lazy(self, missing: &[(u64, u64)]) -> Result<(Vm, Arc<LazyRam>), VmError> {
        if self.loaded.is_none() {
            return Err(VmError::NothingLoaded);
        }
        let lazy = Arc::new(LazyRam::new(&self.parts.ram, missing)?);
        let mut vm = self.start()?;
        vm.lazy = Some(lazy.clone());
        Ok((vm, lazy))
    }

    /// Starts the vCPUs where the loaded state left them.
    pub fn start(self) -> Result<Vm, VmError> {
        let Some(loaded) = self.loaded else {
            return Err(VmError::NothingLoaded);
        };
        Vm::launch(
            self.parts,
            loaded.machine,
            loaded.cpuid,
            Some(SavedDevices {
                serial: &loaded.serial,
                net: loaded.net.as_ref(),
                block: loaded.block.as_ref(),
            }),
            (self.net, self.net_held),
            self.block,
            Instant::now(),
        )
    }
}

/// What `load_state` took from the record for `start`.
struct Loaded {
    machine: MachineConfig,
    cpuid: Vec<kvm_cpuid_entry2>,
    serial: DeviceStates,
    net: Option<NetSection>,
    block: Option<BlockSection>,
}

/// The devices' saved state a restored VM is launched with.
#[derive(Clone, Copy)]
struct SavedDevices<'a> {
    serial: &'a DeviceStates,
    net: Option<&'a NetSection>,
    block: Option<&'a BlockSection>,
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
    build_with(GuestRam::new(mem_bytes, prealloc)?, vcpus)
}

fn build_with(ram: GuestRam, vcpus: u32) -> Result<Parts, VmError> {
    let host = KvmHost::open()?;
    crate::config::check_vcpus(vcpus, &host)?;
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
    let manual_dirty = crate::dirty::enable_manual_protect(&vm_fd);
    Ok(Parts {
        manual_dirty,
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
