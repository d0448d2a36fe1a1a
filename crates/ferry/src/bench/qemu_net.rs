//! QEMU's side of the network row: each QEMU runs in its host's network
//! namespace with a `virtio-net-device` on that host's tap of the netlab
//! topology, and the migration goes between the hosts' addresses, as
//! Ferry's does on that row.
//!
//! The tap is opened here the way Ferry's VMM opens it (netlab's
//! `open_tap`: an existing tap, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, inside
//! the host's namespace) and handed to QEMU as a descriptor
//! (`-netdev tap,fd=N,vhost=off`), so QEMU never creates or configures a
//! tap of its own: the topology's tap, already on the host's bridge, is
//! the one both engines use.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use ferry_netlab::{in_netns, open_tap, MacAddr, NetlabError};

/// The descriptor number QEMU finds its tap on (after stdin, stdout and
/// stderr).
pub const TAP_FD: RawFd = 3;

/// Why QEMU could not be put on the network row's topology.
#[derive(Debug, thiserror::Error)]
pub enum QemuNetError {
    #[error("cannot open tap {tap} in namespace {ns} for QEMU (is the topology up, and no other VM on it?): {source}")]
    Tap {
        ns: String,
        tap: String,
        // Boxed: a NetlabError is large, and this one is rare.
        #[source]
        source: Box<NetlabError>,
    },
    #[error("cannot start QEMU in namespace {ns}: {source}")]
    Namespace {
        ns: String,
        // Boxed: a NetlabError is large, and this one is rare.
        #[source]
        source: Box<NetlabError>,
    },
    #[error(
        "cannot find a free TCP port on {ip} in namespace {ns} for QEMU's -incoming: {source}"
    )]
    Port {
        ns: String,
        ip: Ipv4Addr,
        #[source]
        source: io::Error,
    },
}

/// One host's end: its namespace and its tap.
#[derive(Debug, Clone)]
pub struct QemuNic {
    pub ns: String,
    pub tap: String,
}

/// The network row's placement of one QEMU migration.
#[derive(Debug, Clone)]
pub struct QemuNet {
    /// The card's MAC (the same as Ferry's on that row).
    pub mac: MacAddr,
    /// Host A, where the source QEMU runs.
    pub source: QemuNic,
    /// Host B, where the destination QEMU runs and listens.
    pub destination: QemuNic,
    /// Host B's own address: the destination's `-incoming` listens there.
    pub destination_ip: Ipv4Addr,
}

impl QemuNet {
    pub fn nic(&self, destination: bool) -> &QemuNic {
        if destination {
            &self.destination
        } else {
            &self.source
        }
    }

    /// The card: a tap backend on [`TAP_FD`] (vhost off: the tap is read
    /// by QEMU's own thread, as Ferry's VMM reads its own) and a
    /// virtio-net-device in one of microvm's virtio-mmio slots.
    pub fn device_args(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("tap,id=n0,fd={TAP_FD},vhost=off"),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", self.mac),
        ]
    }

    /// `tcp:IP:PORT` on host B's address, on a port free in its namespace
    /// right now.
    pub fn incoming_uri(&self) -> Result<String, QemuNetError> {
        let (ns, ip) = (&self.destination.ns, self.destination_ip);
        let port = in_netns(ns, || {
            TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
        .map_err(|source| QemuNetError::Namespace {
            ns: ns.clone(),
            source: Box::new(source),
        })?
        .map_err(|source| QemuNetError::Port {
            ns: ns.clone(),
            ip,
            source,
        })?;
        Ok(format!("tcp:{ip}:{port}"))
    }
}

/// Starts `cmd` inside `nic`'s namespace with `nic`'s tap open on
/// [`TAP_FD`]. The outer error is the namespace's or the tap's, the inner
/// one the spawn's (for the caller to tell a missing QEMU apart).
pub fn spawn_on_tap(cmd: &mut Command, nic: &QemuNic) -> Result<io::Result<Child>, QemuNetError> {
    let tap = open_tap(&nic.ns, &nic.tap).map_err(|source| QemuNetError::Tap {
        ns: nic.ns.clone(),
        tap: nic.tap.clone(),
        source: Box::new(source),
    })?;
    let raw = tap.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only dup2 and fcntl, which are async-signal-safe; it touches
    // no memory but its captured integer. `tap` stays open in the parent
    // until spawn has returned, so `raw` is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if raw == TAP_FD {
                // Already in place: only let it survive the exec.
                let flags = libc::fcntl(raw, libc::F_GETFD);
                if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, TAP_FD) < 0 {
                // dup2's copy has no close-on-exec flag.
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A process starts in the namespace of the thread that forks it.
    let spawned = in_netns(&nic.ns, || cmd.spawn()).map_err(|source| QemuNetError::Namespace {
        ns: nic.ns.clone(),
        source: Box::new(source),
    });
    drop(tap);
    spawned
}
