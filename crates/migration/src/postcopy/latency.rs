//! Percentiles of remote page fault latency, for the report.

/// p50, p99 and max of `samples` (microseconds); zeros when empty.
pub fn summarize(samples: &mut [u64]) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i.min(samples.len() - 1)]
    };
    (at(0.50), at(0.99), samples[samples.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(summarize(&mut v), (51, 99, 100));
        assert_eq!(summarize(&mut []), (0, 0, 0));
        assert_eq!(summarize(&mut [7]), (7, 7, 7));
    }
}
