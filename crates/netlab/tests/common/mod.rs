//! Helpers shared by netlab's tests: skipping loudly where the topology
//! cannot run, prefixes unique to this process, and what the system holds
//! (namespaces, interfaces) to compare before and after.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_netlab::Topology;

/// Prints a loud SKIPPED line and returns false when the topology cannot
/// be built here.
pub fn can_run(test: &str) -> bool {
    match Topology::skip_reason() {
        None => true,
        Some(reason) => {
            eprintln!("SKIPPED: {test}: {reason}");
            false
        }
    }
}

/// A prefix no other test or helper uses: the branch name, this process
/// and a counter. The first call also removes the topologies of earlier
/// test processes that were killed before their guards ran.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    static CLEAN: std::sync::Once = std::sync::Once::new();
    CLEAN.call_once(remove_stale_topologies);
    format!(
        "netlab{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Topologies named `netlab<pid>-<n>` whose process is gone.
fn remove_stale_topologies() {
    let stale: BTreeSet<String> = namespaces()
        .into_iter()
        .filter_map(|ns| {
            let rest = ns.strip_prefix("netlab")?;
            let (pid, tail) = rest.split_once('-')?;
            let (n, _) = tail.split_once('-')?;
            let alive = std::path::Path::new("/proc").join(pid).exists();
            (pid.parse::<u32>().is_ok() && n.parse::<u32>().is_ok() && !alive)
                .then(|| format!("netlab{pid}-{n}"))
        })
        .collect();
    for prefix in stale {
        eprintln!("removing the topology of a dead test process: {prefix}");
        if let Err(e) = Topology::down_prefix(&prefix) {
            eprintln!("could not remove {prefix}: {e}");
        }
    }
}

fn lines(program: &str, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(program).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Namespace names (first word of `ip netns list`).
pub fn namespaces() -> BTreeSet<String> {
    lines("ip", &["netns", "list"])
        .into_iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Interface names of the root namespace.
pub fn root_interfaces() -> BTreeSet<String> {
    lines("ip", &["-o", "link", "show"])
        .into_iter()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_string())
        })
        .collect()
}

/// The namespaces and root interfaces that carry `prefix` or `tag`: what a
/// topology would leave behind (other helpers' names never match them).
pub fn leftovers(prefix: &str, tag: &str) -> Vec<String> {
    let mut left: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    left.extend(
        root_interfaces()
            .into_iter()
            .filter(|i| i.starts_with(&format!("{tag}-")) || i.starts_with(prefix)),
    );
    left
}

/// Runs `program args` and returns stdout, panicking with stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
