//! CPU time a migration costs each side, so that the TLS rows can say what
//! the cipher takes, apart from what the machine's load did to the clock.
//!
//! The source's figure is its migration threads' own (the report's CPU
//! column, round by round): the source process also runs the guest's
//! vCPUs. The destination's is its whole process: its vCPUs run only after
//! the commit.

use ferry_migration::stats::MigrationReport;

/// CPU time `pid` (all its threads) has used, in ms; None if it is gone.
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); the list starts at 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads its integer argument.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_s > 0).then(|| ticks as f64 * 1e3 / per_s as f64)
}

/// CPU time of the source's migration threads over every round, in ms.
pub fn source_migration_cpu_ms(report: &MigrationReport) -> f64 {
    report
        .rounds
        .iter()
        .map(|r| r.duration_ms * r.cpu_percent / 100.0)
        .sum()
}

/// ms of CPU per GiB of memory sent.
pub fn per_gib(cpu_ms: f64, bytes: u64) -> f64 {
    cpu_ms / (bytes.max(1) as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_a_dead_one_none() {
        // Busy for 100 ms of wall time: at least a few clock ticks of CPU.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(100);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(process_cpu_ms(std::process::id()).unwrap() > 0.0);
        assert_eq!(process_cpu_ms(u32::MAX), None);
    }
}
