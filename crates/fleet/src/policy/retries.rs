//! How long a migration may take, and how often a VM is tried again.

use serde::{Deserialize, Serialize};

use crate::model::GIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Attempts per VM (the first included); after the last failure the
    /// VM is reported and left where it runs.
    pub max_attempts: u32,
    /// A migration's completion timeout per GiB of guest memory (KubeVirt's
    /// completionTimeoutPerGiB is 150 s)...
    pub completion_timeout_per_gib_ms: u64,
    /// ...and never less than this.
    pub min_completion_timeout_ms: u64,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            completion_timeout_per_gib_ms: 150_000,
            min_completion_timeout_ms: 30_000,
        }
    }
}

impl Retries {
    /// The completion timeout of a VM with `mem_bytes` of memory.
    pub fn completion_timeout_ms(&self, mem_bytes: u64) -> u64 {
        let per_gib = u128::from(self.completion_timeout_per_gib_ms) * u128::from(mem_bytes)
            / u128::from(GIB);
        (per_gib as u64).max(self.min_completion_timeout_ms)
    }
}
