//! An in-memory guest for the engine's own tests: plain memory, a writer
//! thread that rewrites pages while the "VM" runs and records them as
//! dirty, and pause/resume/throttle that really stop that writer. It has
//! no vCPUs and no KVM: it proves the engine's logic, never a real VM.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::PageBitmap;
use crate::guest::{GuestError, IncomingGuest, LazyMemory, PageReader, PauseTiming, SourceGuest};
use crate::handover::{DestinationNetwork, SourceNetwork};
use crate::protocol::{Offer, RamRange, PAGE_SIZE};
use crate::synthetic_net::{NewPlace, OldPlace};

struct Shared {
    mem: Mutex<Vec<u8>>,
    dirty: Mutex<Option<PageBitmap>>,
    ranges: Vec<RamRange>,
    paused: AtomicBool,
    quit: AtomicBool,
    throttle: AtomicU32,
    writes: AtomicU64,
}

/// A source "VM" of `pages` pages whose writer dirties `rate` pages per ms.
pub struct SyntheticSource {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    pub state: Vec<u8>,
    /// A network card: its frames are forwarded after the commit.
    pub network: Option<OldPlace>,
}

impl SyntheticSource {
    /// Memory starts with every even page holding data and odd ones zero.
    pub fn new(pages: usize, pages_per_ms: u64) -> Self {
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 2 == 0 {
                stamp(page, i, 1);
            }
        }
        let ranges = vec![RamRange {
            gpa: 0,
            len: (pages * PAGE_SIZE) as u64,
        }];
        let shared = Arc::new(Shared {
            mem: Mutex::new(mem),
            dirty: Mutex::new(None),
            ranges,
            paused: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            throttle: AtomicU32::new(0),
            writes: AtomicU64::new(0),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || write_loop(&shared, pages, pages_per_ms))
        };
        Self {
            shared,
            writer: Some(writer),
            state: b"synthetic vcpu state".to_vec(),
            network: None,
        }
    }

    pub fn memory(&self) -> Vec<u8> {
        self.shared.mem.lock().unwrap().clone()
    }

    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }
}

impl Drop for SyntheticSource {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Page content that names its page and generation.
fn stamp(page: &mut [u8], index: usize, generation: u64) {
    for (i, word) in page.chunks_exact_mut(8).enumerate() {
        let v = (index as u64) << 32 ^ generation << 8 ^ i as u64 | 1;
        word.copy_from_slice(&v.to_le_bytes());
    }
}

fn write_loop(shared: &Shared, pages: usize, pages_per_ms: u64) {
    let mut generation = 2u64;
    let mut next = 0usize;
    while !shared.quit.load(Ordering::SeqCst) {
        let throttle = shared.throttle.load(Ordering::Relaxed);
        if shared.paused.load(Ordering::SeqCst) || pages_per_ms == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let tick = Instant::now();
        {
            let mut mem = shared.mem.lock().unwrap();
            // Re-check under the lock: pause() takes it after setting the flag.
            if shared.paused.load(Ordering::SeqCst) {
                continue;
            }
            let mut dirty = shared.dirty.lock().unwrap();
            for _ in 0..pages_per_ms {
                let index = next % pages;
                // Every third page written becomes zero: zero runs in later
                // rounds must clear data the destination already holds.
                if generation % 3 == 0 {
                    mem[index * PAGE_SIZE..(index + 1) * PAGE_SIZE].fill(0);
                } else {
                    stamp(
                        &mut mem[index * PAGE_SIZE..(index + 1) * PAGE_SIZE],
                        index,
                        generation,
                    );
                }
                if let Some(d) = dirty.as_mut() {
                    d.set_range((index * PAGE_SIZE) as u64, PAGE_SIZE as u64, true);
                }
                next += 7;
                generation += 1;
                shared.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        let slept = Duration::from_millis(1) * (100 + throttle) / 100;
        // Always let go for a moment: std's mutex is not fair, and a
        // writer slower than its tick (a debug build) would otherwise
        // starve every reader.
        std::thread::sleep(
            slept
                .saturating_sub(tick.elapsed())
                .max(Duration::from_micros(100)),
        );
    }
}

impl SourceGuest for SyntheticSource {
    fn describe(&self) -> Result<Offer, GuestError> {
        let mem_bytes = self.shared.ranges.iter().map(|r| r.len).sum();
        Ok(Offer {
            mem_bytes,
            vcpus: 1,
            ram_ranges: self.shared.ranges.clone(),
            tsc_khz: 1_000_000,
            cpuid: vec![1, 2, 3],
            features: vec!["synthetic".into()],
            disks: Vec::new(),
            copies_disks: false,
        })
    }

    fn populated(&self) -> Result<Vec<RamRange>, GuestError> {
        Ok(self.shared.ranges.clone())
    }

    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_memory(&self.shared, gpa, dst)
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), GuestError> {
        *self.shared.dirty.lock().unwrap() = on.then(|| PageBitmap::new(&self.shared.ranges));
        Ok(())
    }

    fn harvest_dirty(&mut self) -> Result<PageBitmap, GuestError> {
        let mut dirty = self.shared.dirty.lock().unwrap();
        let fresh = PageBitmap::new(&self.shared.ranges);
        Ok(dirty.replace(fresh).ok_or("dirty logging is off")?)
    }

    fn set_throttle(&mut self, percent: u32) -> Result<(), GuestError> {
        self.shared.throttle.store(percent, Ordering::Relaxed);
        Ok(())
    }

    fn pause(&mut self) -> Result<PauseTiming, GuestError> {
        let requested = std::time::Instant::now();
        self.shared.paused.store(true, Ordering::SeqCst);
        // Taking the lock waits out a write in progress.
        drop(self.shared.mem.lock().unwrap());
        Ok(PauseTiming {
            requested,
            all_stopped: std::time::Instant::now(),
        })
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.shared.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        Ok(self.state.clone())
    }

    fn memory_reader(&self) -> Result<Arc<dyn PageReader>, GuestError> {
        Ok(Arc::new(SharedReader(self.shared.clone())))
    }

    fn network_after_commit(&mut self) -> Option<Box<dyn SourceNetwork>> {
        Some(Box::new(self.network.clone()?))
    }
}

struct SharedReader(Arc<Shared>);

impl PageReader for SharedReader {
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
        read_memory(&self.0, gpa, dst)
    }
}

fn read_memory(shared: &Shared, gpa: u64, dst: &mut [u8]) -> Result<(), GuestError> {
    let mem = shared.mem.lock().unwrap();
    let start = gpa as usize;
    let src = mem
        .get(start..start + dst.len())
        .ok_or_else(|| format!("read outside memory at {gpa:#x}"))?;
    dst.copy_from_slice(src);
    Ok(())
}

/// The receiving end: a zeroed buffer of the offered size.
pub struct SyntheticIncoming {
    pub mem: Vec<u8>,
    pub state: Option<Vec<u8>>,
    /// Refuse `load_state` (to test a destination that fails late).
    pub fail_load: bool,
    /// A network card, handed to a post-copy for the forwarded frames.
    pub network: Option<NewPlace>,
}

impl SyntheticIncoming {
    pub fn new(bytes: u64) -> Self {
        Self {
            mem: vec![0; bytes as usize],
            state: None,
            fail_load: false,
            network: None,
        }
    }
}

/// What a started synthetic VM is: its memory and state, and with
/// post-copy the memory that fills while it "runs".
pub struct SyntheticRunning {
    pub mem: Vec<u8>,
    pub state: Vec<u8>,
    pub lazy: Option<Arc<SyntheticLazy>>,
    pub network: Option<NewPlace>,
}

/// Post-copy memory without a kernel: `touch` plays a vCPU that reads a
/// page and waits, as a real one would inside userfaultfd, until the page
/// is placed.
pub struct SyntheticLazy {
    mem: Mutex<(Vec<u8>, PageBitmap)>,
    placed: Condvar,
    faults: Mutex<VecDeque<u64>>,
    fault_raised: Condvar,
}

impl SyntheticLazy {
    /// Reads the page at `gpa`, waiting for it if it is missing.
    pub fn touch(&self, gpa: u64) -> Vec<u8> {
        let page = gpa & !(PAGE_SIZE as u64 - 1);
        let mut guard = self.mem.lock().unwrap();
        if !guard.1.contains(page) {
            self.faults.lock().unwrap().push_back(page);
            self.fault_raised.notify_all();
            while !guard.1.contains(page) {
                guard = self.placed.wait(guard).unwrap();
            }
        }
        guard.0[page as usize..page as usize + PAGE_SIZE].to_vec()
    }

    /// All of memory, once every page is here.
    pub fn memory(&self) -> Vec<u8> {
        self.mem.lock().unwrap().0.clone()
    }

    fn put(&self, gpa: u64, len: u64, data: Option<&[u8]>) -> Result<(), GuestError> {
        let mut guard = self.mem.lock().unwrap();
        let (mem, present) = &mut *guard;
        if (gpa + len) as usize > mem.len() {
            return Err(format!("{gpa:#x}+{len:#x} is outside memory").into());
        }
        for i in 0..len / PAGE_SIZE as u64 {
            let at = gpa + i * PAGE_SIZE as u64;
            if present.contains(at) {
                continue;
            }
            let dst = &mut mem[at as usize..at as usize + PAGE_SIZE];
            match data {
                Some(d) => {
                    dst.copy_from_slice(&d[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE])
                }
                None => dst.fill(0),
            }
            present.set_range(at, PAGE_SIZE as u64, true);
        }
        self.placed.notify_all();
        Ok(())
    }
}

impl LazyMemory for SyntheticLazy {
    fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, GuestError> {
        let queue = self.faults.lock().unwrap();
        let (mut queue, _) = self
            .fault_raised
            .wait_timeout_while(queue, timeout, |q| q.is_empty())
            .unwrap();
        Ok(queue.pop_front())
    }

    fn place(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.put(gpa, data.len() as u64, Some(data))
    }

    fn place_zero(&self, gpa: u64, len: u64) -> Result<(), GuestError> {
        self.put(gpa, len, None)
    }

    fn finish(&self) -> Result<(), GuestError> {
        Ok(())
    }
}

impl IncomingGuest for SyntheticIncoming {
    type Running = SyntheticRunning;

    fn memory_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(gpa).ok()?;
        self.mem.get_mut(start..start.checked_add(len)?)
    }

    fn ram_mut(&mut self) -> Vec<(u64, &mut [u8])> {
        vec![(0, self.mem.as_mut_slice())]
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        if self.fail_load {
            return Err("this synthetic destination refuses every state".into());
        }
        self.state = Some(state.to_vec());
        Ok(())
    }

    fn start(self) -> Result<SyntheticRunning, GuestError> {
        Ok(SyntheticRunning {
            mem: self.mem,
            state: self.state.ok_or("started without a state")?,
            lazy: None,
            network: self.network,
        })
    }

    fn network_of(running: &SyntheticRunning) -> Option<Box<dyn DestinationNetwork>> {
        Some(Box::new(running.network.clone()?))
    }

    fn start_lazy(
        self,
        missing: &PageBitmap,
    ) -> Result<(SyntheticRunning, Arc<dyn LazyMemory>), GuestError> {
        let state = self.state.ok_or("started without a state")?;
        // Present: every page but the missing ones.
        let ranges = [RamRange {
            gpa: 0,
            len: self.mem.len() as u64,
        }];
        let mut present = PageBitmap::new(&ranges);
        present.set_range(0, self.mem.len() as u64, true);
        let mut mem = self.mem;
        for run in missing.runs() {
            present.set_range(run.gpa, run.bytes(), false);
            mem[run.gpa as usize..(run.gpa + run.bytes()) as usize].fill(0xee);
        }
        let lazy = Arc::new(SyntheticLazy {
            mem: Mutex::new((mem, present)),
            placed: Condvar::new(),
            faults: Mutex::new(VecDeque::new()),
            fault_raised: Condvar::new(),
        });
        Ok((
            SyntheticRunning {
                mem: Vec::new(),
                state,
                lazy: Some(lazy.clone()),
                network: self.network,
            },
            lazy,
        ))
    }
}

#[cfg(test)]
#[path = "synthetic_tests.rs"]
mod tests;
