//! `ferry restore FILE`: continues a snapshotted VM where it stopped, then
//! watches it like `ferry run`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_vmm::snapshot::read_snapshot;
use ferry_vmm::Vm;

use crate::commands::run::{supervise, RestoreFigures, SuperviseArgs};
use crate::size::{parse_size, show_size};

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// A snapshot written by `ferry snapshot`.
    pub file: PathBuf,
    /// Refuse the snapshot unless it is of a VM with this much memory.
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Refuse the snapshot unless it is of a VM with this many vCPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Fault in all guest memory before loading it.
    #[arg(long)]
    pub prealloc: bool,
    /// The tap the VM's virtio-net card plugs into:
    /// tap=NAME[,netns=NS] (the MAC is the snapshot's).
    #[arg(long, value_name = "tap=NAME[,netns=NS]")]
    pub net: Option<crate::net_flag::NetFlag>,
    /// The image the VM's disk continues on: path=IMG[,readonly]. It must
    /// hold what the disk held when the snapshot was taken (the snapshot
    /// carries the device, not the image: take it with `--stop`, and do
    /// not run anything else on the image in between).
    #[arg(long, value_name = "path=IMG[,readonly]")]
    pub disk: Option<crate::disk_flag::DiskFlag>,
    #[command(flatten)]
    pub supervise: SuperviseArgs,
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<bool> {
    let start = Instant::now();
    let (record, memory) = read_snapshot(&args.file)?;
    let config = record.config.clone();
    if let Some(mem) = args.mem.filter(|&m| m != config.mem_bytes) {
        bail!(
            "{} is a VM with {} of memory, not {} (--mem)",
            args.file.display(),
            show_size(config.mem_bytes),
            show_size(mem)
        );
    }
    if let Some(vcpus) = args.vcpus.filter(|&v| v != config.vcpus) {
        bail!(
            "{} is a VM with {} vCPUs, not {} (--vcpus)",
            args.file.display(),
            config.vcpus,
            vcpus
        );
    }
    if let (Some(saved), None) = (&record.net, &args.net) {
        bail!(
            "{} is a VM with a virtio-net card (MAC {}); give it a tap with --net tap=NAME[,netns=NS]",
            args.file.display(),
            ferry_netlab::MacAddr(saved.device.mac)
        );
    }
    match (&record.block, &args.disk) {
        (Some(saved), None) => bail!(
            "{} is a VM with a disk ({} on {}); give it its image with --disk path=IMG",
            args.file.display(),
            show_size(saved.device.sectors * 512),
            saved.device.path
        ),
        (None, Some(_)) => bail!(
            "{} is a VM without a disk; restore it without --disk",
            args.file.display()
        ),
        _ => {}
    }
    let api = args.supervise.bind_api()?;
    let record_read = start.elapsed();
    let mut loaded = None;
    let net = args.net.clone().map(|n| n.0);
    let disk = args.disk.as_ref().map(|d| &d.0);
    let mut vm = Vm::restore_with_devices(&record, args.prealloc, net, disk, |ram| {
        loaded = Some(memory.load_memory(ram)?);
        Ok::<_, ferry_vmm::snapshot::SnapshotError>(())
    })
    .with_context(|| format!("cannot restore {}", args.file.display()))?;
    let restore_ms = start.elapsed().as_secs_f64() * 1e3;
    let stats = loaded.expect("memory was loaded before the VM started");
    let events = vm.take_events().expect("events are taken once, here");
    let read_secs = stats.copy_ms / 1e3;
    eprintln!(
        "ferry: restored {} vCPU(s), {} from {} in {:.1} ms (state {:.1} ms, memory {} at {:.0} MiB/s)",
        config.vcpus,
        show_size(config.mem_bytes),
        args.file.display(),
        restore_ms,
        record_read.as_secs_f64() * 1e3,
        show_size(stats.memory_bytes),
        stats.memory_bytes as f64 / (1 << 20) as f64 / read_secs.max(1e-9)
    );
    let figures = RestoreFigures {
        file: args.file.clone(),
        restore_ms,
        memory_bytes: stats.memory_bytes,
        read_mib_per_s: stats.memory_bytes as f64 / (1 << 20) as f64 / read_secs.max(1e-9),
    };
    supervise(
        vm,
        events,
        api,
        start,
        &args.supervise,
        super::run::Extra::Restored(figures),
        &mut |_| None,
    )
}
