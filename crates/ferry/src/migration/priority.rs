//! Migration work yields the CPU to the guest: the thread that sends or
//! receives pages runs at a lower priority while it does, so on a busy
//! host it is the copy that waits, not the guest's vCPUs (a vCPU thread
//! preempted for a scheduler slice is a stall of several milliseconds the
//! guest sees). The blackout is not slowed by it: the vCPUs are paused then.

/// Nice value of a thread doing migration work.
const MIGRATION_NICE: i32 = 10;

pub use ferry_control::CpuPriority;

/// Lowers this thread's priority for the guests' sake, if that is the
/// choice, until the returned guard is dropped.
pub fn apply(priority: CpuPriority) -> Option<Yielding> {
    (priority == CpuPriority::Guest).then(Yielding::start)
}

/// Lowers this thread's priority until dropped.
pub struct Yielding {
    previous: i32,
}

impl Yielding {
    pub fn start() -> Self {
        let previous = get();
        set(MIGRATION_NICE);
        Self { previous }
    }
}

impl Drop for Yielding {
    fn drop(&mut self) {
        set(self.previous);
    }
}

/// Puts this thread back to normal priority early: threads it creates
/// (vCPUs) inherit its nice value.
pub fn normal() {
    set(0);
}

fn tid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

fn get() -> i32 {
    // SAFETY: getpriority only reads its integer arguments; -1 may be a
    // valid answer, and then 0 is as good a guess as any.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid()) };
    nice.clamp(-20, 19)
}

fn set(nice: i32) {
    // SAFETY: setpriority only reads its integer arguments; failing (no
    // permission to go back below the current value) leaves the thread as
    // it was, which is harmless.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), nice) };
}
