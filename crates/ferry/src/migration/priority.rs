//! Migration work yields the CPU to the guest (`--priority guest`): the
//! threads that send or receive pages run only on cores the guests leave
//! (see `ferry_migration::thread_priority`), so on a busy host it is the
//! copy that waits, not the guest's vCPUs.

pub use ferry_control::CpuPriority;
pub use ferry_migration::thread_priority::{normal, Yielding};

/// Lowers this thread's priority for the guests' sake, if that is the
/// choice, until the returned guard is dropped.
pub fn apply(priority: CpuPriority) -> Option<Yielding> {
    (priority == CpuPriority::Guest).then(Yielding::start)
}
