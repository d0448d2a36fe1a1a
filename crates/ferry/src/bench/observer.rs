//! What a bench row may do at two points of a migration run, the same for
//! both engines: the network row starts its client once the guest is up
//! on the source, and stops it once the guest has been verified on the
//! destination. The other rows do nothing there.

/// Called by [`super::ferry_side`] and [`super::qemu`] during one run.
pub trait RunObserver {
    /// The guest printed READY on the source; the settle comes next. An
    /// error ends the run (both VMs are stopped).
    fn guest_ready(&mut self) -> Result<(), String>;

    /// The migration completed and the destination's guest was watched
    /// until it verified (or the watch timed out); the destination still
    /// runs.
    fn guest_moved(&mut self);
}

/// The observer of the rows that only migrate.
pub struct NoObserver;

impl RunObserver for NoObserver {
    fn guest_ready(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn guest_moved(&mut self) {}
}
