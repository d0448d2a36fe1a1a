//! Who gets a core when a migration and the guests compete for one.

/// Who gets a core when the migration and the guests on this host compete
/// for one (`--priority`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum CpuPriority {
    /// The guests: migration threads yield (nice 10), so the migration
    /// takes only the cores the vCPUs leave idle.
    #[default]
    Guest,
    /// The migration: its threads run at normal priority and share cores
    /// with the vCPUs, which then lose scheduler slices (the guest sees
    /// stalls of a few milliseconds) while memory moves faster.
    Migration,
}
