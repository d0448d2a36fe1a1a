//! `ferryd --config host.toml`: the host agent.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "ferryd", version, about = "Ferry's host agent")]
struct Args {
    /// The host's config (TOML).
    #[arg(long, required_unless_present = "print_openapi")]
    config: Option<PathBuf>,
    /// Print the API's OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn main() {
    let args = Args::parse();
    if args.print_openapi {
        print!("{}", ferry_agent::api::openapi_json());
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(args.config.expect("clap requires --config")) {
        eprintln!("ferryd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let config = ferry_agent::config::Config::load(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(ferry_agent::server::run(config))?;
    Ok(())
}
