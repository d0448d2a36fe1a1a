//! The two things vCPUs share besides counters: a spin lock that keeps
//! console lines whole, and a one-shot publication of the boot plan that
//! vCPU 0 makes and the others wait for. Both spin with `pause`: there are
//! no interrupts and no scheduler to block on.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::time::pause;

/// A lock that protects no data, only the order of console output.
pub struct SpinLock {
    locked: AtomicBool,
}

/// Held while alive; releases the lock on drop if it took it.
pub struct SpinGuard<'a> {
    lock: &'a SpinLock,
    held: bool,
}

impl SpinLock {
    pub const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            pause();
        }
    }

    /// Like [`SpinLock::lock`], but gives up after `spins` tries and goes
    /// ahead without the lock: the panic path must print even when the
    /// panicking vCPU itself holds it.
    pub fn lock_or_force(&self, spins: u32) -> SpinGuard<'_> {
        for _ in 0..spins {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            pause();
        }
        SpinGuard {
            lock: self,
            held: false,
        }
    }

    fn try_lock(&self) -> Option<SpinGuard<'_>> {
        // Test before the locked exchange so waiters spin on a shared line.
        if !self.locked.load(Ordering::Relaxed)
            && self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            Some(SpinGuard {
                lock: self,
                held: true,
            })
        } else {
            None
        }
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        if self.held {
            self.lock.locked.store(false, Ordering::Release);
        }
    }
}

const EMPTY: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

/// A value written once (by vCPU 0) and then read by everyone.
pub struct Published<T> {
    state: AtomicU32,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written exactly once, by the caller that wins the
// EMPTY -> WRITING exchange, before READY is stored with Release; readers
// touch it only after seeing READY with Acquire, and never mutate it.
unsafe impl<T: Send + Sync> Sync for Published<T> {}

impl<T> Published<T> {
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores `value` and releases every waiter. Panics if called twice.
    pub fn publish(&self, value: T) -> &T {
        if self
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            panic!("boot plan published twice");
        }
        // SAFETY: winning the exchange makes this the only writer, and no
        // reader looks at the value before READY.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        self.get().unwrap_or_else(|| unreachable!())
    }

    /// Spins until the value is published.
    pub fn wait(&self) -> &T {
        loop {
            if let Some(value) = self.get() {
                return value;
            }
            pause();
        }
    }

    fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) == READY {
            // SAFETY: READY (Acquire) is stored only after the value was
            // fully written, and it is never written again.
            Some(unsafe { (*self.value.get()).assume_init_ref() })
        } else {
            None
        }
    }
}

/// A static that one caller takes for good: the network's buffers and
/// state, which only vCPU 0 ever touches. Taking it twice gives `None`.
pub struct Exclusive<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reachable only through the one `&'static mut` that
// `take` hands out (to the caller that wins the exchange); `T: Send`
// because that caller may be any vCPU.
unsafe impl<T: Send> Sync for Exclusive<T> {}

impl<T> Exclusive<T> {
    pub const fn new(value: T) -> Self {
        Self {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, to the first caller only.
    // A `&mut` from `&self` is the point: the exchange makes it unique.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self
            .taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: winning the exchange makes this the only reference
            // ever handed out, and it is never taken back.
            Some(unsafe { &mut *self.value.get() })
        } else {
            None
        }
    }
}
