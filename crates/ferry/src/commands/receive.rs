//! `ferry receive --listen ADDR`: the destination of one live migration.
//! Judges the offer against this host, receives the VM, starts it only
//! after the commit, then supervises it like `ferry run` (with `--api`, so
//! it can be migrated on again).

use std::cell::Cell;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_migration::precopy::{
    error_chain, receive as receive_vm, send_resumed, send_started, ReceiveOptions,
};
use ferry_migration::transport::{Acceptor, Link, Listener, SessionToken};
use ferry_vmm::compat::IncomingLimits;
use ferry_vmm::GuestRam;

use super::run::{supervise, Ending, Extra, SuperviseArgs};
use crate::migration::incoming::accept;
use crate::migration::network::{NetAnnouncer, NetDestination};
use ferry_migration::handover::{
    announce_on_schedule, deliver_forwarded, DeliverReport, ForwardLimits, ANNOUNCE_SCHEDULE,
};
use ferry_migration::protocol::NET_HANDOVER_VERSION;
use ferry_vmm::devices::net::NetHandle;

#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// host:port to listen on; port 0 picks a free one (printed on stderr).
    #[arg(long)]
    pub listen: String,
    /// Fault in all of the VM's memory when it is reserved.
    #[arg(long)]
    pub prealloc: bool,
    /// Reserve (with --prealloc: fault in) this much memory before any
    /// source connects, as QEMU's `-m` does for `-incoming`; a VM of
    /// another size gets memory made when it is offered.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub mem: Option<u64>,
    /// Refuse VMs with more memory than this (e.g. 4G).
    #[arg(long, value_parser = crate::size::parse_size)]
    pub max_mem: Option<u64>,
    /// Refuse VMs with more vCPUs than this.
    #[arg(long)]
    pub max_vcpus: Option<u32>,
    /// How long a post-copy whose link to the source failed waits for the
    /// source to reconnect (the VM waits on its missing pages meanwhile)
    /// before the VM is declared lost.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse_duration)]
    pub recovery_timeout: std::time::Duration,
    /// Who gets a core when receiving competes with the guests on this
    /// host: guest (the receiver yields) or migration.
    #[arg(long, value_enum, default_value = "guest")]
    pub priority: crate::migration::priority::CpuPriority,
    /// Mutual TLS 1.3: this host's identity directory (ca.crt, cert.pem,
    /// key.pem, as `ferry ca issue` writes it). Needs --allow-source.
    #[arg(long, value_name = "DIR", requires = "allow_source")]
    pub tls: Option<std::path::PathBuf>,
    /// A source host allowed to migrate here (its certificate's host
    /// name); repeat for several. Every other peer is refused.
    #[arg(long, value_name = "HOST", requires = "tls")]
    pub allow_source: Vec<String>,
    /// Take the VM in the clear, from anyone. The source must be told the
    /// same.
    #[arg(long, conflicts_with = "tls")]
    pub insecure_plaintext: bool,
    /// The tap the VM's virtio-net card plugs into here:
    /// tap=NAME[,netns=NS] (the MAC is the VM's own). A VM with a card is
    /// refused without it, before any page moves.
    #[arg(long, value_name = "tap=NAME[,netns=NS]")]
    pub net: Option<crate::net_flag::NetFlag>,
    /// The image the VM's disk continues on here: path=IMG[,readonly], on
    /// storage this host shares with the source (the same image). It is
    /// opened before any page moves and locked before the VM runs here; a
    /// VM with a disk is refused without it.
    #[arg(long, value_name = "path=IMG[,readonly]")]
    pub disk: Option<crate::disk_flag::DiskFlag>,
    /// Test/diagnostic control only: never announce the VM's MAC here
    /// after the commit, so the fabric learns the new place only from the
    /// guest's own traffic. It shows what the announce is worth; never
    /// use it in production.
    #[arg(long)]
    pub no_announce: bool,
    /// A file (mode 0600) with the one-time session token of the migration
    /// this destination is prepared for: every connection must open with
    /// it (protocol v8), any other is refused and the wait goes on.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub supervise: SuperviseArgs,
}

/// The acceptor the flags ask for; plaintext only when asked by name.
fn acceptor(args: &ReceiveArgs) -> anyhow::Result<Acceptor> {
    let acceptor = secured_acceptor(args)?;
    Ok(match &args.token_file {
        Some(file) => acceptor.with_token(SessionToken::read_file(file).context("--token-file")?),
        None => acceptor,
    })
}

fn secured_acceptor(args: &ReceiveArgs) -> anyhow::Result<Acceptor> {
    match &args.tls {
        Some(dir) => Acceptor::tls_from_dir(dir, args.allow_source.iter().cloned())
            .with_context(|| format!("--tls {}", dir.display())),
        None if args.insecure_plaintext => Ok(Acceptor::plaintext()),
        None => bail!(
            "refusing to receive in the clear: give --tls DIR --allow-source HOST (mutual TLS 1.3), or --insecure-plaintext on both sides to take a VM unencrypted from anyone"
        ),
    }
}

/// Waits for a connection that passes the acceptor; refused ones are
/// logged and the wait goes on, up to `deadline`.
fn next_source(
    listener: &Listener,
    deadline: Option<Instant>,
) -> anyhow::Result<(Link, std::net::SocketAddr)> {
    listener.set_nonblocking(deadline.is_some())?;
    loop {
        match listener.accept_or_refuse() {
            Ok(Ok(taken)) => {
                listener.set_nonblocking(false)?;
                taken.0.set_nonblocking(false)?;
                return Ok(taken);
            }
            Ok(Err(refusal)) => {
                eprintln!("ferry: {refusal}; still waiting for the source");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    bail!("no source connected within --duration");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting the source's connection"),
        }
    }
}

/// How long to wait for a started VM's first vCPU to enter the guest
/// (normally microseconds) before giving up on reporting when it did.
const FIRST_RUN_WAIT: Duration = Duration::from_millis(500);

pub fn receive(args: ReceiveArgs) -> anyhow::Result<bool> {
    let api = args.supervise.bind_api()?;
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
    let listener = Listener::new(listener, acceptor(&args)?);
    let waiting_since = Instant::now();
    let mut reserved = match args.mem {
        Some(size) => {
            let t = Instant::now();
            let ram = GuestRam::new(size, args.prealloc).context("--mem")?;
            eprintln!(
                "ferry: reserved {} MiB{} in {:.1} ms",
                size >> 20,
                ram.prealloc_note(),
                t.elapsed().as_secs_f64() * 1e3
            );
            Some(ram)
        }
        None => None,
    };
    eprintln!("ferry: listening on {}", listener.local_addr()?);
    let limits = IncomingLimits {
        max_mem_bytes: args.max_mem,
        max_vcpus: args.max_vcpus,
    };
    let prealloc = args.prealloc;
    let net = args.net.clone().map(|n| n.0);
    let disk = args.disk.clone().map(|d| d.0);
    // A copied disk's image is made here; after a failed move it must be
    // gone again (say so: the operator may look for it).
    let disk_was_absent = disk.as_ref().is_some_and(|d| !d.path.exists());
    let deadline = args.supervise.duration.map(|d| waiting_since + d);
    // A connection that fails before it offers a VM (garbage, a stranger,
    // a broken Hello) changes nothing here: wait for the real source.
    let (received, peer, start) = loop {
        let (stream, peer) = next_source(&listener, deadline)?;
        let start = Instant::now();
        let transport = stream.describe();
        let yielding = crate::migration::priority::apply(args.priority);
        let options = ReceiveOptions {
            link_recovery: args.recovery_timeout,
            ..Default::default()
        };
        let offered = Cell::new(false);
        // The listener stays open for the fault channel of a post-copy.
        let received = receive_vm(stream, Some(&listener), &options, |offer| {
            offered.set(true);
            accept(
                offer,
                &limits,
                prealloc,
                reserved.take(),
                net.as_ref(),
                disk.as_ref(),
            )
        });
        drop(yielding);
        match received {
            Err(e) if !offered.get() => {
                eprintln!(
                    "ferry: dropped a connection from {peer} that offered no VM: {}; still waiting for the source",
                    error_chain(&e)
                );
                continue;
            }
            received => {
                eprintln!("ferry: transport from {peer}: {transport}");
                break (received, peer, start);
            }
        }
    };
    drop(listener);
    let received = match received {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "ferry: incoming migration from {peer} failed: {}; no VM runs here",
                error_chain(&e)
            );
            if let Some(d) = disk.as_ref().filter(|_| disk_was_absent) {
                if d.path.exists() {
                    eprintln!(
                        "ferry: a partial disk image is left at {}, marked incomplete: the next copy there replaces it",
                        d.path.display()
                    );
                } else {
                    eprintln!("ferry: no disk image is left at {}", d.path.display());
                }
            }
            return Ok(false);
        }
    };
    let mut vm = received.vm;
    let report = received.report;
    let mut stream = received.stream;
    eprintln!(
        "ferry: VM received from {peer} ({} vCPU, {} MiB, {} rounds, state loaded in {:.2} ms, started {:.2} ms after the commit)",
        report.vcpus,
        report.mem_bytes >> 20,
        report.rounds,
        report.load_ms,
        report.start_ms
    );
    if let Some((path, bytes, _)) = vm.disk() {
        eprintln!(
            "ferry: disk {} ({} MiB) taken over: its lock is held here since the state was loaded",
            path.display(),
            bytes >> 20
        );
    }
    // Committed and running here: now, and only now, the network may
    // learn the VM's new place (QEMU's schedule of five announces).
    if args.no_announce && vm.net().is_some() {
        eprintln!("ferry: --no-announce: the VM's MAC is not announced here");
    }
    let announcing = vm.net().filter(|_| !args.no_announce).map(|net| {
        let t0 = Instant::now();
        eprintln!(
            "ferry: virtio-net card {} on tap {}; announcing it here",
            net.mac(),
            net.tap_name()
        );
        announce_on_schedule(
            std::sync::Arc::new(NetAnnouncer(net)),
            ANNOUNCE_SCHEDULE,
            t0,
        )
    });
    if let Some(Err(e)) = &announcing {
        eprintln!("ferry: cannot start announcing the VM's MAC: {e}");
    }
    if let Some(Ok(thread)) = announcing {
        std::thread::spawn(move || {
            if let Ok((sent, failure)) = thread.join() {
                let at: Vec<String> = sent.iter().map(|ms| format!("{ms:.1}")).collect();
                eprintln!(
                    "ferry: announced the VM's MAC at [{}] ms after the start{}",
                    at.join(", "),
                    failure
                        .map(|f| format!(" (failed: {f})"))
                        .unwrap_or_default()
                );
            }
        });
    }
    let mut postcopy = received.postcopy;
    if postcopy.is_none() {
        // The source adds this side's share to its downtime figure.
        if let Some(first_run) = vm.first_run_since_resume(FIRST_RUN_WAIT) {
            send_started(&mut stream, &report, first_run);
        }
    }
    // The card started held: the frames that reached the old place since
    // the pause come first (a v7 source forwards them after a pre-copy
    // commit; a v11 one during a post-copy, whose handle delivers them and
    // opens the tap), then this host's tap opens.
    if let Some(net) = vm.net() {
        if report.version >= NET_HANDOVER_VERSION && postcopy.is_none() {
            let handed = deliver_forwarded(
                &mut stream,
                &mut NetDestination(net.clone()),
                &ForwardLimits::default(),
            );
            say_handed(&handed, &net);
        } else if !postcopy.as_ref().is_some_and(|h| h.forwards_network()) {
            net.release();
        }
    }
    if let Some(h) = &postcopy {
        eprintln!(
            "ferry: post-copy: the VM runs here without {} of its pages ({} MiB); fetching them from {peer}",
            h.needed_pages(),
            (h.needed_pages() * 4096) >> 20
        );
    }
    let net_card = vm.net();
    let events = vm.take_events().expect("a fresh VM has its events");
    let mut told = false;
    let mut link_was_down = false;
    let recovery_timeout = args.recovery_timeout;
    supervise(
        vm,
        events,
        api,
        start,
        &args.supervise,
        Extra::Received(report),
        &mut |watch| {
            if !told && watch.first_seq.is_some() {
                told = true;
                let (stall, seq) = (Some(watch.first_stall_us), watch.first_seq);
                match &postcopy {
                    Some(h) => h.note_resumed(stall, seq),
                    None => send_resumed(&mut stream, stall, seq),
                }
            }
            if let Some(h) = &postcopy {
                match h.link_down() {
                    Some(reason) if !link_was_down => {
                        link_was_down = true;
                        eprintln!(
                            "ferry: post-copy: the link to the source failed ({reason}); the VM waits on its {} missing pages; waiting up to {recovery_timeout:?} for the source to reconnect",
                            h.missing_pages()
                        );
                    }
                    None if link_was_down => {
                        link_was_down = false;
                        eprintln!(
                            "ferry: post-copy: the source reconnected ({} time(s)); {} pages still to come",
                            h.recoveries(),
                            h.missing_pages()
                        );
                    }
                    _ => {}
                }
            }
            let h = postcopy.take_if(|h| h.is_finished())?;
            let missing = h.missing_pages();
            if let (Some(handed), Some(net)) = (h.network_report(), net_card.as_ref()) {
                say_handed(&handed, net);
            }
            match h.wait() {
                Ok(c) => {
                    eprintln!(
                        "ferry: post-copy complete: all {} pages here {:.1} ms after the start; {} remote faults, latency p50 {} us, p99 {} us, max {} us",
                        c.pages,
                        c.last_page_us as f64 / 1e3,
                        c.requested_pages,
                        c.fault_p50_us,
                        c.fault_p99_us,
                        c.fault_max_us
                    );
                    None
                }
                Err(e) => {
                    eprintln!(
                        "ferry: post-copy FAILED: {}; the VM lacks {missing} pages that only the source held: it is LOST here and stopped, never run on partial memory",
                        error_chain(&e)
                    );
                    Some(Ending::MemoryLost)
                }
            }
        },
    )
}

/// The destination's line on the network handover.
fn say_handed(handed: &DeliverReport, net: &NetHandle) {
    eprintln!(
        "ferry: network handover: {} frames forwarded from the old place delivered ({} by the source's count, {} dropped there), this tap opened {:.1} ms after the start{}; card stats {:?}",
        handed.delivered,
        handed.source_forwarded.unwrap_or(0),
        handed.source_dropped.unwrap_or(0),
        handed.opened_ms,
        handed
            .error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default(),
        net.stats()
    );
}
