//! QEMU's side of the local-disk row, the way libvirt migrates a VM whose
//! disk the destination does not share: each QEMU has its own raw image
//! behind the same `virtio-blk-device`; the destination (started paused,
//! `-S`, as well as `-incoming defer`) exports its empty image writable
//! over NBD on loopback TCP; the source mirrors its disk there
//! (`blockdev-mirror`, sync=full, onto an NBD client node) until the job
//! is READY, then migrates memory as the other rows do. Once the
//! migration completes, `block-job-cancel` ends the mirror (after READY a
//! cancel first copies what is still dirty, leaving a consistent copy, but
//! does not switch the source over to it), the destination stops its NBD
//! server and only then continues: its guest never runs on a disk the
//! source is still writing.
//!
//! The bench connects the NBD socket itself and hands QEMU the descriptor
//! (`getfd`), keeping a copy: the kernel's TCP_INFO on it then says how
//! many bytes the mirror really sent (QEMU's job `offset` counts the
//! image's zero areas too, which go as NBD write-zeroes without data).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// The drive's id on both sides; also the NBD export's name.
pub const DRIVE_ID: &str = "disk0";
/// The source's NBD client node, the mirror's target.
pub const TARGET_NODE: &str = "mirror-target";
pub const JOB_ID: &str = "mirror0";
/// The name the connected NBD socket has in the source QEMU (`getfd`).
pub const NBD_FD_NAME: &str = "nbd-mirror";
/// How long the mirror may take to reach READY, and a cancelled one to end.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(60);

/// The disk of one QEMU run of the local row.
#[derive(Debug, Clone)]
pub struct QemuDisk {
    /// The source's image (which must exist).
    pub source_image: PathBuf,
    /// The destination's image: fresh, of the same size.
    pub destination_image: PathBuf,
    /// MiB of blocks the guest writes and checks (`disk=MIB:max`).
    pub mib: u64,
    /// False only in tests: no mirror at all, so the destination's guest
    /// finds its disk empty and must say so.
    mirrored: bool,
}

impl QemuDisk {
    pub fn new(source_image: PathBuf, destination_image: PathBuf, mib: u64) -> Self {
        QemuDisk {
            source_image,
            destination_image,
            mib,
            mirrored: true,
        }
    }

    /// The same disk with no mirror: every block the guest acknowledged
    /// on the source is missing on the destination.
    #[cfg(test)]
    pub(crate) fn without_mirror(self) -> Self {
        QemuDisk {
            mirrored: false,
            ..self
        }
    }

    pub(crate) fn mirrored(&self) -> bool {
        self.mirrored
    }

    /// `-drive` and `-device` for one side: a raw image, no host cache
    /// (O_DIRECT, as Ferry's VMM writes through to the file), QEMU's
    /// default thread-pool I/O, in one of microvm's virtio-mmio slots.
    pub fn device_args(&self, destination: bool) -> Vec<String> {
        let image = if destination {
            &self.destination_image
        } else {
            &self.source_image
        };
        vec![
            "-drive".into(),
            format!(
                "file={},if=none,id={DRIVE_ID},format=raw,cache=none,aio=threads",
                image.display()
            ),
            "-device".into(),
            format!("virtio-blk-device,drive={DRIVE_ID}"),
        ]
    }

    /// Blocks of a whole round of the guest's disk workload.
    pub fn round_blocks(&self) -> u64 {
        self.mib << 8
    }
}

/// The NBD server's address on the destination: loopback, a port free
/// right now.
pub fn nbd_server_arguments(port: u16) -> serde_json::Value {
    serde_json::json!({
        "addr": {
            "type": "inet",
            "data": { "host": Ipv4Addr::LOCALHOST.to_string(), "port": port.to_string() }
        }
    })
}

/// Connects to the destination's NBD server, for the source to use.
pub fn connect_nbd(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What the disk part of one QEMU run measured. Times are milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct QemuDiskOutcome {
    /// From starting the mirror to READY (the first full copy).
    pub mirror_ready_ms: f64,
    /// From `block-job-cancel` to the job's end, the source paused.
    pub mirror_cancel_ms: f64,
    /// From the migration's `completed` to the destination's `cont`:
    /// the cancel, `nbd-server-stop` and waiting for the destination to
    /// have loaded the state. Part of the guest's blackout.
    pub completion_to_cont_ms: f64,
    /// Bytes the mirror's NBD connection carried to the destination
    /// (TCP_INFO bytes_acked): requests and the blocks' data.
    pub mirror_bytes_sent: u64,
    /// Bytes the destination answered with (NBD replies).
    pub mirror_bytes_received: u64,
    /// The job's own count (`offset` at its end): every byte it copied
    /// or zeroed, the image's holes included.
    pub mirror_job_bytes: u64,
    /// `ram.transferred` of the migration alone.
    pub ram_bytes: u64,
    /// Blocks the destination's guest read back and checked after the move.
    pub disk_blocks_checked: u64,
    pub disk_errors: u64,
}

impl QemuDiskOutcome {
    /// Nothing mirrored; the guest's figures are filled in later.
    pub(crate) fn unmirrored(completion_to_cont_ms: f64) -> Self {
        QemuDiskOutcome {
            mirror_ready_ms: f64::NAN,
            mirror_cancel_ms: f64::NAN,
            completion_to_cont_ms,
            mirror_bytes_sent: 0,
            mirror_bytes_received: 0,
            mirror_job_bytes: 0,
            ram_bytes: 0,
            disk_blocks_checked: 0,
            disk_errors: 0,
        }
    }
}

/// TCP_INFO's bytes_acked and bytes_received of `stream`.
pub fn tcp_bytes(stream: &TcpStream) -> std::io::Result<(u64, u64)> {
    let info = ferry_migration::cpu_clock::tcp_info(stream)?;
    Ok((info.tcpi_bytes_acked, info.tcpi_bytes_received))
}
