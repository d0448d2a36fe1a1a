//! The destination: judges an offer against this host, builds the VM it
//! describes, and hands the engine its memory and state loader.

use std::sync::Arc;
use std::time::Duration;

use ferry_migration::bitmap::PageBitmap;
use ferry_migration::guest::{GuestError, IncomingGuest, LazyMemory};
use ferry_migration::handover::DestinationNetwork;
use ferry_migration::protocol::Offer;
use ferry_vmm::compat::{check_incoming, decode_cpuid, IncomingLimits, OfferedVm};
use ferry_vmm::lazy::LazyRam;
use ferry_vmm::state::StateRecord;
use ferry_vmm::vm::IncomingVm;
use ferry_vmm::{GuestRam, KvmHost, Vm};

use ferry_migration::protocol::DISK_COPY_BASE;
use ferry_vmm::devices::block::copy_target::CopyTarget;
use ferry_vmm::devices::block::device::BlockConfig;
use ferry_vmm::devices::net::NetConfig;

use super::network::NetDestination;
use super::source::{DISK_FEATURE, NET_FEATURE, VM_FEATURES};
use super::storage::DiskPlan;

/// Test-only: milliseconds the destination waits, with the VM paused on
/// the source, before it takes a shared disk's lock. The test of a lock
/// taken by a third process at the hand-over sets it, so that its thief
/// wins a race it would otherwise have to win within microseconds. Never
/// set in production: it lengthens the blackout.
const TEST_LOCK_DELAY_ENV: &str = "FERRY_TEST_DISK_LOCK_DELAY_MS";

pub struct Incoming {
    vm: IncomingVm,
    /// See [`TEST_LOCK_DELAY_ENV`]; read once, before any page moves.
    test_lock_delay: Option<Duration>,
    /// How long the copied disk's flush before StateLoaded took (said
    /// once the VM runs, not in the blackout).
    disk_flush: Option<Duration>,
    /// The image a copied disk arrives in: deleted with this value unless
    /// the VM starts on it.
    disk_copy: Option<CopyTarget>,
}

/// Checks the offer against this host and `limits`, then reserves (and
/// with `prealloc` faults in) the VM's memory. Err is the reason the
/// source is told.
pub fn accept(
    offer: &Offer,
    limits: &IncomingLimits,
    prealloc: bool,
    reserved: Option<GuestRam>,
    net: Option<&NetConfig>,
    disk: Option<&BlockConfig>,
) -> Result<Incoming, String> {
    if let Some(unknown) = offer.features.iter().find(|f| {
        !VM_FEATURES.contains(&f.as_str()) && ![NET_FEATURE, DISK_FEATURE].contains(&f.as_str())
    }) {
        return Err(format!(
            "the VM needs feature {unknown:?}, which this host does not offer"
        ));
    }
    let wants_net = offer.features.iter().any(|f| f == NET_FEATURE);
    if wants_net && net.is_none() {
        return Err(
            "the VM has a virtio-net card and this destination has no network for it (start ferry receive with --net tap=NAME)"
                .into(),
        );
    }
    let disk = super::storage::judge(offer, disk)?;
    let cpuid = decode_cpuid(&offer.cpuid)?;
    let host = KvmHost::open().map_err(|e| e.to_string())?;
    let vm = OfferedVm {
        mem_bytes: offer.mem_bytes,
        vcpus: offer.vcpus,
        tsc_khz: offer.tsc_khz,
        cpuid: &cpuid,
    };
    check_incoming(&host, &vm, limits).map_err(|e| e.to_string())?;
    let incoming = match reserved.filter(|r| r.size() == offer.mem_bytes) {
        Some(ram) => IncomingVm::with_ram(ram, offer.vcpus, offer.tsc_khz),
        None => IncomingVm::new(offer.mem_bytes, offer.vcpus, offer.tsc_khz, prealloc),
    }
    .map_err(|e| format!("cannot build the VM here: {e}"))?;
    let mut incoming = incoming;
    // Now, not in the blackout: the state then finds it in place.
    incoming
        .preset_cpuid(&cpuid)
        .map_err(|e| format!("cannot give the vCPUs the offered CPUID: {e}"))?;
    if wants_net {
        // Opens the tap now: a missing or busy one refuses the offer.
        incoming
            .set_net(net.cloned())
            .map_err(|e| format!("the VM's network here: {e}"))?;
        // Released once the source's forwarded frames are in (or at once
        // when the source forwards none).
        incoming.hold_net_at_start();
    }
    let mut disk_copy = None;
    match &disk {
        Some(DiskPlan::Shared(config, bytes)) => {
            // Opens the image now, without its lock (the source holds it
            // until the pause): a missing or wrong image refuses the offer.
            incoming
                .set_block(config, *bytes)
                .map_err(|e| format!("the VM's disk here: {e}"))?;
        }
        Some(DiskPlan::Copied(config, bytes)) => {
            // Made and its space reserved now: a filesystem without room
            // refuses the offer before a block moves.
            let target = CopyTarget::create(&config.path, *bytes)
                .map_err(|e| format!("the VM's disk here: {e}"))?;
            // Nobody else knows this image: its lock is taken with the
            // state, as for shared storage.
            incoming
                .set_block(config, *bytes)
                .map_err(|e| format!("the VM's disk here: {e}"))?;
            disk_copy = Some(target);
        }
        None => {}
    }
    let built: Vec<(u64, u64)> = incoming
        .ram()
        .regions()
        .iter()
        .map(|r| (r.0 .0, r.1))
        .collect();
    let offered: Vec<(u64, u64)> = offer.ram_ranges.iter().map(|r| (r.gpa, r.len)).collect();
    if built != offered {
        return Err(format!(
            "the VM's RAM layout {offered:x?} differs from this host's {built:x?}"
        ));
    }
    let test_lock_delay = std::env::var(TEST_LOCK_DELAY_ENV)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .filter(|_| matches!(disk, Some(DiskPlan::Shared(..))));
    Ok(Incoming {
        vm: incoming,
        disk_copy,
        test_lock_delay,
        disk_flush: None,
    })
}

impl IncomingGuest for Incoming {
    type Running = Vm;

    fn memory_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        if gpa >= DISK_COPY_BASE {
            let image = self.disk_copy.as_mut()?.as_mut_slice();
            let at = usize::try_from(gpa - DISK_COPY_BASE).ok()?;
            return image.get_mut(at..at.checked_add(len)?);
        }
        self.vm.memory_mut(gpa, len)
    }

    fn ram_mut(&mut self) -> Vec<(u64, &mut [u8])> {
        let mut all = self.vm.ram_mut();
        if let Some(copy) = self.disk_copy.as_mut() {
            all.push((DISK_COPY_BASE, copy.as_mut_slice()));
        }
        all
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let record = StateRecord::decode(state)?;
        if let Some(copy) = &mut self.disk_copy {
            // Every block is here: on the storage, and no longer marked a
            // partial copy, before the source is told the state loaded, so
            // a commit never leaves a disk that a crash of this host would
            // lose or a later copy would delete.
            let t = std::time::Instant::now();
            copy.complete()?;
            self.disk_flush = Some(t.elapsed());
        }
        if let Some(delay) = self.test_lock_delay {
            std::thread::sleep(delay);
        }
        self.vm.load_state(&record)?;
        Ok(())
    }

    fn start(self) -> Result<Vm, GuestError> {
        // The VM runs on the copied image from now on.
        if let Some(copy) = self.disk_copy {
            let path = copy.keep();
            if let Some(t) = self.disk_flush {
                eprintln!(
                    "ferry: copied disk {} complete; its flush before the state was acknowledged took {:.2} ms of the blackout",
                    path.display(),
                    t.as_secs_f64() * 1e3
                );
            }
        }
        // The vCPU threads inherit this thread's priority.
        super::priority::normal();
        Ok(self.vm.start()?)
    }

    fn start_lazy(self, missing: &PageBitmap) -> Result<(Vm, Arc<dyn LazyMemory>), GuestError> {
        // The vCPU threads, and the fault service started next, inherit
        // this thread's priority: a fault must be served at once.
        super::priority::normal();
        if self.disk_copy.is_some() {
            return Err(
                "a copied disk moves by pre-copy only; the VM is not started lazily".into(),
            );
        }
        let ranges: Vec<(u64, u64)> = missing.runs().iter().map(|r| (r.gpa, r.bytes())).collect();
        let (vm, lazy) = self.vm.start_lazy(&ranges)?;
        Ok((vm, Arc::new(LazyGuestRam(lazy))))
    }

    fn network_of(vm: &Vm) -> Option<Box<dyn DestinationNetwork>> {
        Some(Box::new(NetDestination(vm.net()?)))
    }
}

/// The VMM's userfaultfd-backed memory as the engine sees it. The VM
/// holds the same userfaultfd until its vCPUs stop, whatever the engine
/// drops.
struct LazyGuestRam(Arc<LazyRam>);

impl LazyMemory for LazyGuestRam {
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, GuestError> {
        Ok(self.0.next_fault(timeout)?)
    }

    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.0.place(gpa, data)?;
        Ok(())
    }

    fn place_zero(&self, gpa: u64, len: u64) -> Result<(), GuestError> {
        self.0.place_zero(gpa, len)?;
        Ok(())
    }

    fn finish(&self) -> Result<(), GuestError> {
        Ok(self.0.finish()?)
    }
}
