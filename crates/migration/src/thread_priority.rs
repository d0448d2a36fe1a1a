//! Who gets a core, at each stage of a migration.
//!
//! - Live rounds, `--priority guest` ([`Yielding`]): the migration's threads
//!   yield (nice 10). Where the VM's own vCPUs leave no core free, the brake
//!   parks them for a guaranteed share so that the migration still moves,
//!   and the threads run SCHED_IDLE in the cores it frees.
//! - The blackout ([`Boost`]): never starved. From the pause to the resume
//!   the threads that finish the migration run at the highest priority this
//!   host allows, whatever `--priority` chose. The vCPUs are stopped then,
//!   so nothing is taken from the guest; what is kept off the cores is
//!   everything else on the host.
//! - Post-copy on the source ([`Serving`]): the VM runs on the destination
//!   and waits for every page still here, so the threads that send them
//!   run at normal priority, whatever `--priority` chose for the live
//!   rounds (SCHED_IDLE there would let any busy thread on the host hold
//!   the guest's faults).
//! - After the commit ([`Background`]): the source's teardown runs at a
//!   low priority.

/// Real-time priority of a blackout thread: just under the threaded
/// interrupt handlers (50), so a NIC's interrupts are still served while
/// the last pages go out, and far under the kernel's per-CPU threads (99).
const BLACKOUT_RT_PRIORITY: libc::c_int = 49;
/// Linux's flag (sched.h) that resets a policy to normal, nice 0, in
/// threads the caller creates; the libc crate does not carry it.
const SCHED_RESET_ON_FORK: libc::c_int = 0x4000_0000;
/// Where SCHED_IDLE is refused, live-round work yields at this nice value.
const YIELD_NICE: libc::c_int = 10;
/// The fallback where real-time scheduling is refused: the best nice.
const BLACKOUT_NICE: libc::c_int = -20;

/// What the boost got from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoostLevel {
    /// SCHED_FIFO at this priority.
    Realtime(i32),
    /// Normal scheduling at this nice value.
    Nice(i32),
    /// Nothing better than before was allowed.
    Unchanged,
}

impl BoostLevel {
    pub fn describe(self) -> String {
        match self {
            Self::Realtime(p) => format!("SCHED_FIFO {p}"),
            Self::Nice(n) => format!("nice {n}"),
            Self::Unchanged => "unchanged (the host refused a higher priority)".into(),
        }
    }
}

/// The calling thread's scheduling class, parameter and nice, to put
/// back exactly as they were.
#[derive(Debug)]
struct SavedScheduling {
    policy: libc::c_int,
    param: libc::sched_param,
    nice: libc::c_int,
}

impl SavedScheduling {
    fn capture() -> Self {
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: both calls only read their integer arguments and write the
        // sched_param we own; pid 0 is the calling thread.
        let policy = unsafe {
            libc::sched_getparam(0, &mut param);
            libc::sched_getscheduler(0)
        };
        Self {
            policy,
            param,
            nice: current_nice(),
        }
    }

    fn restore(&self) {
        // SAFETY: sched_setscheduler reads the sched_param we own; pid 0 is
        // the calling thread, and the values are what it reported for it.
        unsafe { libc::sched_setscheduler(0, self.policy, &self.param) };
        set_nice(self.nice);
    }
}

/// Raises the calling thread's priority until dropped, then puts back
/// exactly what it had.
#[derive(Debug)]
pub struct Boost {
    saved: SavedScheduling,
    pub level: BoostLevel,
}

impl Boost {
    pub fn start() -> Self {
        let saved = SavedScheduling::capture();
        let nice = saved.nice;
        let rt = libc::sched_param {
            sched_priority: BLACKOUT_RT_PRIORITY,
        };
        // Threads this one creates meanwhile (a destination's vCPUs, which
        // spin) must not inherit the boost: they would take the cores from
        // every other thread, this one included.
        let fifo = libc::SCHED_FIFO | SCHED_RESET_ON_FORK;
        // SAFETY: sched_setscheduler reads the sched_param we pass; pid 0
        // is the calling thread. Failing leaves the thread as it was.
        let level = if unsafe { libc::sched_setscheduler(0, fifo, &rt) } == 0 {
            BoostLevel::Realtime(BLACKOUT_RT_PRIORITY)
        } else if reset_on_fork_other() && set_nice(BLACKOUT_NICE) && current_nice() < nice {
            BoostLevel::Nice(current_nice())
        } else {
            BoostLevel::Unchanged
        };
        Self { saved, level }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        self.saved.restore();
    }
}

/// Normal scheduling (SCHED_OTHER, nice 0) until dropped, then exactly
/// what the thread had. Threads it starts meanwhile inherit normal
/// scheduling too.
#[derive(Debug)]
pub struct Serving {
    saved: SavedScheduling,
}

impl Serving {
    pub fn start() -> Self {
        let saved = SavedScheduling::capture();
        normal();
        Self { saved }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.saved.restore();
    }
}

/// The opposite of a boost, for work after a commit that nothing waits
/// for (stopping the source's vCPU threads, freeing its memory): nice 10,
/// so that on a shared host the VM that now runs elsewhere, or any other,
/// waits little for it, while it still finishes in seconds (SCHED_IDLE
/// could hold the memory for as long as other VMs keep the cores busy,
/// and nice 19 took over 30 s to free 1 GiB next to four busy vCPUs on
/// two cores). Puts back what the thread had when dropped.
#[derive(Debug)]
pub struct Background {
    _lowered: Yielding,
}

impl Background {
    /// Normal scheduling at nice 10, whatever the thread had: a thread the
    /// live rounds left SCHED_IDLE would wait out every busy thread on the
    /// host before its memory is freed.
    pub fn start() -> Self {
        let saved = SavedScheduling::capture();
        normal();
        set_nice(BACKGROUND_NICE);
        Self {
            _lowered: Yielding { saved },
        }
    }
}

/// Nice value of after-commit teardown.
const BACKGROUND_NICE: libc::c_int = 10;

/// Live-round work that yields to the guests: nice 10 until dropped, so
/// the migration's share next to a busy vCPU stays small (SCHED_IDLE would
/// let other busy VMs on the host starve it for good; a 0.1 ms slice, tried
/// too, cut one stream's rate several times over and did not make a woken
/// vCPU preempt any sooner). Threads this one creates (page-data streams)
/// inherit it; a thread that starts vCPUs must call [`normal`] first.
#[derive(Debug)]
pub struct Yielding {
    saved: SavedScheduling,
}

impl Yielding {
    pub fn start() -> Self {
        Self::at_nice(YIELD_NICE)
    }

    /// This thread at `nice` until dropped.
    fn at_nice(nice: libc::c_int) -> Self {
        let saved = SavedScheduling::capture();
        set_nice(nice);
        Self { saved }
    }

    /// For a source whose vCPUs take every core and give the migration
    /// its share through the brake: SCHED_IDLE, so the migration runs in
    /// the cores the brake frees and a vCPU it lets go takes its core back
    /// at once (measured here: the brake's parks then cost the guest about
    /// 3.5 ms at 50%, against 9 to 19 ms at nice 10, where the woken vCPU
    /// waits for the next tick).
    pub fn start_idle() -> Self {
        let saved = SavedScheduling::capture();
        let idle = libc::sched_param { sched_priority: 0 };
        // SAFETY: as in `Boost::start`; failing leaves the thread as it was.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } != 0 {
            set_nice(YIELD_NICE);
        }
        Self { saved }
    }
}

impl Drop for Yielding {
    /// Puts back the class too: a thread left SCHED_IDLE after its
    /// migration (its teardown, freeing the guest's memory) ran only when
    /// nothing else on the host wanted a core, and took minutes.
    fn drop(&mut self) {
        self.saved.restore();
    }
}

/// Normal scheduling at nice 0 for this thread, so that the threads it
/// creates next (a destination's vCPUs, its fault service) start there.
pub fn normal() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `Boost::start`.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    set_nice(0);
}

/// Normal scheduling, with children reset to nice 0 (see `start`).
fn reset_on_fork_other() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = libc::SCHED_OTHER | SCHED_RESET_ON_FORK;
    // SAFETY: as in `start`.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

fn tid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

fn current_nice() -> libc::c_int {
    // SAFETY: getpriority only reads its integer arguments; -1 may be a
    // valid answer, which the clamp keeps.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid()) }.clamp(-20, 19)
}

fn set_nice(nice: libc::c_int) -> bool {
    // SAFETY: setpriority only reads its integer arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), nice) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_started_under_a_boost_do_not_inherit_it() {
        let _boost = Boost::start();
        let child = std::thread::spawn(|| {
            // SAFETY: pid 0 is this thread; the call only reads it.
            (unsafe { libc::sched_getscheduler(0) }, current_nice())
        })
        .join()
        .unwrap();
        assert_eq!(child, (libc::SCHED_OTHER, 0));
    }

    #[test]
    fn yielding_idle_and_the_teardown_after_it_leave_the_thread_normal() {
        std::thread::spawn(|| {
            // SAFETY: pid 0 is this thread; the call only reads it.
            let policy = || unsafe { libc::sched_getscheduler(0) };
            drop(Yielding::start_idle());
            assert_eq!((policy(), current_nice()), (libc::SCHED_OTHER, 0));
            let idle = Yielding::start_idle();
            let _teardown = Background::start();
            assert_eq!(
                (policy(), current_nice()),
                (libc::SCHED_OTHER, BACKGROUND_NICE)
            );
            std::mem::forget(idle);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn serving_lifts_an_idle_thread_to_normal_and_puts_it_back() {
        std::thread::spawn(|| {
            let idle = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is this thread; the call reads `idle`.
            let went_idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } == 0;
            {
                let _serving = Serving::start();
                // SAFETY: pid 0 is this thread; the call only reads it.
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
                let child = std::thread::spawn(|| {
                    // SAFETY: as above.
                    unsafe { libc::sched_getscheduler(0) }
                })
                .join()
                .unwrap();
                assert_eq!(child, libc::SCHED_OTHER);
            }
            if went_idle {
                // SAFETY: as above.
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_boost_puts_back_what_the_thread_had() {
        std::thread::spawn(|| {
            set_nice(5);
            let before = current_nice();
            // SAFETY: pid 0 is this thread; the call only reads it.
            let policy = unsafe { libc::sched_getscheduler(0) };
            {
                let boost = Boost::start();
                // SAFETY: geteuid has no arguments and cannot fail.
                if unsafe { libc::geteuid() } == 0 {
                    assert_ne!(boost.level, BoostLevel::Unchanged);
                }
            }
            assert_eq!(current_nice(), before);
            // SAFETY: pid 0 is this thread; the call only reads it.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, policy);
        })
        .join()
        .unwrap();
    }
}
