//! The capacity ledger: every VM's reservation of memory and vCPUs
//! against what the config lets this host give. A reservation is taken
//! before a VMM is started and released when it is gone; incoming
//! migrations will reserve here the same way.

use std::collections::BTreeMap;

use crate::config::Capacity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no capacity: {what} asks {asked} but only {free} of {total} is free ({used} reserved)")]
pub struct NoCapacity {
    pub what: &'static str,
    pub asked: String,
    pub free: String,
    pub total: String,
    pub used: String,
}

/// Why something holds capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A VM of this host.
    Vm,
    /// An incoming migration prepared here: released if it is not
    /// committed in time, turned into `Vm` when it is.
    Incoming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub holder: Holder,
}

#[derive(Debug)]
pub struct Ledger {
    capacity: Capacity,
    held: BTreeMap<String, Reservation>,
}

impl Ledger {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            held: BTreeMap::new(),
        }
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Memory and vCPUs reserved now.
    pub fn used(&self) -> (u64, u32) {
        self.held
            .values()
            .fold((0, 0), |(m, v), r| (m + r.mem_bytes, v + r.vcpus))
    }

    /// Reserves for `key`, or says what is short. A key that already holds
    /// a reservation keeps it (re-adoption reserves again harmlessly).
    pub fn reserve(&mut self, key: &str, r: Reservation) -> Result<(), NoCapacity> {
        if self.held.contains_key(key) {
            return Ok(());
        }
        let (mem, vcpus) = self.used();
        let mib = |b: u64| format!("{} MiB", b >> 20);
        if mem + r.mem_bytes > self.capacity.mem_bytes {
            return Err(NoCapacity {
                what: "memory",
                asked: mib(r.mem_bytes),
                free: mib(self.capacity.mem_bytes.saturating_sub(mem)),
                total: mib(self.capacity.mem_bytes),
                used: mib(mem),
            });
        }
        if vcpus + r.vcpus > self.capacity.vcpus {
            return Err(NoCapacity {
                what: "vCPUs",
                asked: r.vcpus.to_string(),
                free: self.capacity.vcpus.saturating_sub(vcpus).to_string(),
                total: self.capacity.vcpus.to_string(),
                used: vcpus.to_string(),
            });
        }
        self.held.insert(key.to_owned(), r);
        Ok(())
    }

    /// Forces a reservation in (an adopted VM already runs, whatever the
    /// config now says).
    pub fn force(&mut self, key: &str, r: Reservation) {
        self.held.insert(key.to_owned(), r);
    }

    /// Memory reserved by holders of one kind.
    pub fn held_by(&self, holder: Holder) -> u64 {
        self.held
            .values()
            .filter(|r| r.holder == holder)
            .map(|r| r.mem_bytes)
            .sum()
    }

    pub fn release(&mut self, key: &str) {
        self.held.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(mem_mib: u64, vcpus: u32) -> Reservation {
        Reservation {
            mem_bytes: mem_mib << 20,
            vcpus,
            holder: Holder::Vm,
        }
    }

    #[test]
    fn refuses_beyond_capacity_and_frees_on_release() {
        let mut l = Ledger::new(Capacity {
            mem_bytes: 256 << 20,
            vcpus: 2,
        });
        l.reserve("a", vm(128, 1)).unwrap();
        let e = l.reserve("b", vm(192, 1)).unwrap_err();
        assert_eq!(e.what, "memory");
        assert_eq!(e.free, "128 MiB");
        l.reserve("b", vm(128, 1)).unwrap();
        assert_eq!(l.reserve("c", vm(0, 1)).unwrap_err().what, "vCPUs");
        l.release("a");
        l.reserve("c", vm(64, 1)).unwrap();
        assert_eq!(l.used(), (192 << 20, 2));
    }
}
