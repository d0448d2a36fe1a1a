//! How a VM's memory moves: before the VM (pre-copy), after it
//! (post-copy), or pre-copy first and post-copy when pre-copy cannot
//! finish (hybrid).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rounds of pages while the VM runs, then a short blackout.
    #[default]
    Precopy,
    /// The VM moves at once; its pages follow on demand and by push.
    Postcopy,
    /// Pre-copy rounds; a switch to post-copy if they do not converge.
    Hybrid,
    /// Measure the guest's dirty rate and the link first, predict each
    /// mode, and take the best one for the downtime target.
    Auto,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::Hybrid => "hybrid",
            Self::Auto => "auto",
        }
    }

    /// Whether the destination must be able to take post-copy.
    pub fn may_postcopy(self) -> bool {
        !matches!(self, Self::Precopy)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Self::Precopy),
            "postcopy" => Ok(Self::Postcopy),
            "hybrid" => Ok(Self::Hybrid),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown migration mode {other:?}: use precopy, postcopy, hybrid or auto"
            )),
        }
    }
}
