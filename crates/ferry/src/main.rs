//! `ferry`: the one command-line tool. Thin: it parses flags, calls the
//! crates that do the work, and prints what they report.

mod api;
mod bench;
mod child;
mod commands;
mod disk_flag;
mod duration;
mod migration;
mod net_flag;
mod report;
mod size;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Live migration for KVM micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM running the test guest and stream its console.
    Run(commands::run::RunArgs),
    /// Boot a VM, run a dirtying workload, print the verification verdict.
    Demo(commands::demo::DemoArgs),
    /// Write a snapshot of a running VM (`ferry run --api SOCKET`) to a file.
    Snapshot(commands::snapshot::SnapshotArgs),
    /// Continue a VM from a snapshot file.
    Restore(commands::restore::RestoreArgs),
    /// Live-migrate a running VM (`ferry run --api SOCKET`) to a `ferry receive`.
    Migrate(commands::migrate::MigrateArgs),
    /// Wait for one incoming live migration, then run the VM here.
    Receive(commands::receive::ReceiveArgs),
    /// Ferry and QEMU live migration side by side on this machine.
    Bench(commands::bench::BenchArgs),
    /// The VMs of this host, through its agent (ferryd).
    Vm(commands::vm::VmArgs),
    /// The fleet's private CA: `ca init DIR`, `ca issue --name HOST DIR`.
    Ca(commands::ca::CaArgs),
    /// A migration job of this host's agent: `migration show|cancel JOB`.
    Migration(commands::migration::MigrationArgs),
    /// The fleet scheduler: `fleet simulate --hosts 1000 --vms 20000 --drain rack7`.
    Fleet(commands::fleet::FleetArgs),
    /// A host of the fleet: `host drain HOST [--dry-run] [--cancel]`.
    Host(commands::host::HostArgs),
}

fn main() {
    let cli = Cli::parse();
    // The engine and the VMM log what they refuse or work around (a
    // refused connection, a fallback) through tracing; without a
    // subscriber those lines were lost. RUST_LOG overrides the level.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Demo(args) => commands::demo::demo(args),
        Command::Snapshot(args) => commands::snapshot::snapshot(args),
        Command::Restore(args) => commands::restore::restore(args),
        Command::Migrate(args) => commands::migrate::migrate(args),
        Command::Receive(args) => commands::receive::receive(args),
        Command::Bench(args) => commands::bench::bench(args),
        Command::Vm(args) => commands::vm::vm(args),
        Command::Ca(args) => commands::ca::ca(args),
        Command::Migration(args) => commands::migration::migration(args),
        Command::Fleet(args) => commands::fleet::fleet(args),
        Command::Host(args) => commands::host::host(args),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(1);
        }
    }
}
