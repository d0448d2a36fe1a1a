//! Probes a server by hand from a namespace, e.g. a VM on the topology:
//!
//!     scripts/net-topology.sh up demo 7
//!     ferry run ... --net tap=demo-ta,netns=demo-hostA --workload idle+net:10.77.7.2/24:7000 &
//!     cargo run --release -p ferry-netlab --example probe -- demo-client 10.77.7.2:7000 5 [--json]
//!
//! Prints the probe's report after SECONDS (at most 600).

use std::net::SocketAddrV4;
use std::time::Duration;

use ferry_netlab::{Probe, ProbeConfig};

fn main() {
    if let Err(e) = run() {
        eprintln!("probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let words: Vec<&String> = args.iter().filter(|a| *a != "--json").collect();
    let [ns, target, seconds] = words[..] else {
        return Err("usage: probe NAMESPACE IP:PORT SECONDS [--json]".into());
    };
    let target: SocketAddrV4 = target
        .parse()
        .map_err(|e| format!("bad target {target:?}: {e}"))?;
    let seconds: u64 = seconds
        .parse()
        .ok()
        .filter(|s| (1..=600).contains(s))
        .ok_or_else(|| format!("bad SECONDS {seconds:?}: use 1-600"))?;
    let probe = Probe::start(ns, target, ProbeConfig::default())?;
    std::thread::sleep(Duration::from_secs(seconds));
    let report = probe.stop();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
