//! `ferry`: the one command-line tool. Thin: it parses flags, calls the
//! crates that do the work, and prints what they report.

mod commands;
mod duration;
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Demo(args) => commands::demo::demo(args),
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
