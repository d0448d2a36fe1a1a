//! `ferry demo`: boots a VM with a dirtying workload, lets it rewrite and
//! verify its working set a few times, and prints the verdict. (Live
//! migration joins this demo when the migration engine lands.)

use std::time::{Duration, Instant};

use ferry_testguest::workload::Workload;

use crate::commands::run::{boot, watch_until, Ending, VmArgs};
use crate::size::show_size;
use crate::watch::GuestWatch;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Full verified sweeps of the working set to wait for.
    #[arg(long, default_value_t = 3)]
    pub sweeps: u64,
    /// Echo the guest console.
    #[arg(long)]
    pub verbose: bool,
}

/// The demo's workload unless flags say otherwise: 256 MiB rewritten at 1 GiB/s.
pub fn default_workload() -> Workload {
    "dirty:256:1024".parse().expect("a valid built-in workload")
}

pub fn demo(mut args: DemoArgs) -> anyhow::Result<bool> {
    args.vm.workload.get_or_insert_with(default_workload);
    args.vm.vcpus.get_or_insert(2);
    let start = Instant::now();
    println!(
        "Booting a {} vCPU VM with {} of memory, workload {} ...",
        args.vm.vcpus(),
        show_size(args.vm.mem),
        args.vm.workload()
    );
    let (mut vm, events) = boot(&args.vm)?;
    let mut watch = GuestWatch::new(start);
    let want = args.sweeps;
    let ending = watch_until(
        &mut vm,
        &events,
        None,
        &mut watch,
        Some(start + Duration::from_secs(60)),
        !args.verbose,
        |w| w.ready_ms.is_some() && w.sweeps >= want,
    );
    vm.stop();
    let ok = ending == Ending::Predicate && watch.memory_ok() && watch.sequence_breaks == 0;
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    println!(
        "  start to first heartbeat   {}",
        ms(watch.first_heartbeat_ms)
    );
    println!("  start to READY             {}", ms(watch.ready_ms));
    println!(
        "  working set verified       {} full sweeps, {} pages verified, {} errors",
        watch.sweeps, watch.pages_verified, watch.errors
    );
    println!(
        "  longest stall (guest)      {:.3} ms over {} heartbeats",
        watch.max_stall_us as f64 / 1e3,
        watch.heartbeats
    );
    if ok {
        println!(
            "Demo OK: the guest verified every page of its working set {want} times with 0 errors."
        );
    } else {
        println!(
            "Demo FAILED: ended by {ending:?}; guest said: {}",
            watch.stopped.as_deref().unwrap_or("-")
        );
    }
    Ok(ok)
}
