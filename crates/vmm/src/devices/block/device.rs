//! The virtio-blk device on the virtio-mmio transport (slot 1): one
//! request queue served by a worker thread that polls while the guest is
//! busy (notifications suppressed) and sleeps on the queue's eventfd when
//! it is not. Requests are served in order, one at a time, to completion:
//! a request the guest sees completed is on the image (and, after FLUSH or
//! without FLUSH negotiated, on the storage).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::copy_source::DiskCopySource;
use super::image::{Image, ImageError, ImageSpec};
use super::request::WriteCache;
use super::{features as blk, Backend};
use crate::devices::virtio::{features, ActivateError, Activation, DeviceSignals, VirtioDevice};
use crate::memory::GuestMemory;

pub const DEVICE_TYPE_BLOCK: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// How long the worker keeps polling after the last request before it
/// sleeps on the eventfd, and how often it looks while polling.
const BUSY_FOR: Duration = Duration::from_millis(50);
const BUSY_POLL: Duration = Duration::from_micros(200);
/// Longest sleep: stop and pause requests are seen at least this often.
const IDLE_POLL_MS: i32 = 100;

/// `--disk path=IMG[,readonly]`: the image behind slot 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
}

/// The device's part of the state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: String,
    pub readonly: bool,
    pub sectors: u64,
}

/// Counters for the VMM's report.
#[derive(Debug, Default)]
pub struct BlockStats {
    pub requests: AtomicU64,
    pub io_errors: AtomicU64,
}

struct Rings {
    backend: Backend,
    active: Option<(GuestMemory, Queue, WriteCache)>,
}

pub struct Block {
    rings: Arc<Mutex<Rings>>,
    sectors: u64,
    readonly: bool,
    path: PathBuf,
    worker: Option<Worker>,
    paused: Arc<AtomicBool>,
    pub stats: Arc<BlockStats>,
}

struct Worker {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Block {
    /// Opens the image (size checked, exclusive lock taken).
    pub fn new(config: &BlockConfig) -> Result<Block, ImageError> {
        Self::open(config, None, true)
    }

    /// For a VM arriving on shared storage: opens the image the source
    /// still runs on, of exactly `size` bytes, without its lock (the source
    /// holds it until the pause); [`take_lock`](Self::take_lock) takes it
    /// before the VM runs here.
    pub fn new_unlocked(config: &BlockConfig, size: u64) -> Result<Block, ImageError> {
        Self::open(config, Some(size), false)
    }

    fn open(
        config: &BlockConfig,
        expected_size: Option<u64>,
        take_lock: bool,
    ) -> Result<Block, ImageError> {
        let image = Image::open(
            &ImageSpec {
                path: config.path.clone(),
                readonly: config.readonly,
                expected_size,
            },
            take_lock,
        )?;
        Ok(Block {
            sectors: image.sectors(),
            readonly: config.readonly,
            path: config.path.clone(),
            rings: Arc::new(Mutex::new(Rings {
                backend: Backend::new(image, "ferry-disk"),
                active: None,
            })),
            worker: None,
            paused: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(BlockStats::default()),
        })
    }
}

impl Block {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn size_bytes(&self) -> u64 {
        self.sectors * 512
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether this side holds the image's lock.
    pub fn holds_lock(&self) -> bool {
        self.rings.lock().unwrap().backend.image.is_locked()
    }

    /// The device must be paused: every request it took is complete then
    /// (a round runs to its end under the rings' lock), and the ones still
    /// in the ring go with the state. Makes what they wrote visible to the
    /// destination and gives up the lock, so that it can take it. A
    /// read-only image keeps its shared lock: readers do not conflict.
    ///
    /// Through the page cache (a filesystem without O_DIRECT) the written
    /// data is only in this host's memory: it is flushed here, in the
    /// blackout. With O_DIRECT every acknowledged write is on the storage
    /// already, where the destination reads it, so the blackout does not
    /// pay an fdatasync (0.3 to 2 ms on this host's disk): the durability
    /// of writes the guest has not flushed yet moves with the VM, whose
    /// next FLUSH on the destination is an fdatasync of the same file.
    /// Returns whether it flushed.
    pub fn release_for_handover(&self) -> Result<bool, ImageError> {
        assert!(
            self.paused.load(Ordering::Acquire),
            "the disk is handed over only while paused"
        );
        let mut rings = self.rings.lock().unwrap();
        let image = &mut rings.backend.image;
        let flushed = image.mode() == super::image::CacheMode::Buffered;
        if flushed {
            image.flush()?;
        }
        if !self.readonly {
            image.unlock()?;
        }
        Ok(flushed)
    }

    /// A reader of the image for a migration that copies the disk, with
    /// the record of the blocks the guest writes (off until the copy
    /// starts it).
    pub fn copy_source(&self) -> Result<DiskCopySource, ImageError> {
        let rings = self.rings.lock().unwrap();
        let image = &rings.backend.image;
        Ok(DiskCopySource::new(
            image.duplicate()?,
            self.path.clone(),
            image.size(),
            image.mode(),
            rings.backend.dirty.clone(),
            rings.backend.hold.clone(),
        ))
    }

    /// fdatasync (paused: no request is being served).
    pub fn flush(&self) -> Result<(), ImageError> {
        self.rings.lock().unwrap().backend.image.flush()
    }

    /// Takes the image's lock (again): an error if anyone else holds it.
    pub fn take_lock(&self) -> Result<(), ImageError> {
        Ok(self.rings.lock().unwrap().backend.image.lock()?)
    }

    /// Checks the saved device against this one: the same size and mode
    /// (the path may differ between hosts; the offer named the source's).
    pub fn check_saved(&self, saved: &BlockState) -> Result<(), String> {
        if saved.sectors != self.sectors {
            return Err(format!(
                "the saved disk has {} sectors, {} here has {}",
                saved.sectors,
                self.path.display(),
                self.sectors
            ));
        }
        if saved.readonly != self.readonly {
            return Err(format!(
                "the saved disk is {}, here it is {}",
                mode(saved.readonly),
                mode(self.readonly)
            ));
        }
        Ok(())
    }
}

fn mode(readonly: bool) -> &'static str {
    if readonly {
        "read-only"
    } else {
        "writable"
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { blk::RO } else { 0 };
        features::VERSION_1 | blk::FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64) is all the config the device fills in.
        let config = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.reset();
        let mut queues = a.queues;
        let queue = queues
            .pop()
            .filter(|_| queues.is_empty())
            .ok_or_else(|| ActivateError::Queues("virtio-blk has exactly one queue".into()))?;
        let notifier = a
            .notifiers
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError::Queues("no notifier for the request queue".into()))?;
        let cache = if a.acked_features & blk::FLUSH != 0 {
            WriteCache::WriteBack
        } else {
            WriteCache::WriteThrough
        };
        {
            let mut rings = self.rings.lock().unwrap();
            rings
                .backend
                .image
                .activate()
                .map_err(|e| ActivateError::Queues(e.to_string()))?;
            rings.active = Some((a.memory, queue, cache));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?);
        let thread = {
            let (rings, paused, stop, wake, stats, signals) = (
                self.rings.clone(),
                self.paused.clone(),
                stop.clone(),
                wake.clone(),
                self.stats.clone(),
                a.signals,
            );
            std::thread::Builder::new()
                .name("virtio-blk".into())
                .spawn(move || run(&rings, &paused, &stop, &notifier, &wake, &signals, &stats))
                .map_err(ActivateError::Worker)?
        };
        self.worker = Some(Worker {
            thread: Some(thread),
            stop,
            wake,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop.store(true, Ordering::Release);
            let _ = w.wake.write(1);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.rings.lock().unwrap().active = None;
    }

    fn pause(&mut self) {
        self.paused.store(true, Ordering::Release);
        // A round runs holding the lock: taking it waits for that round.
        drop(self.rings.lock().unwrap());
    }

    fn resume(&mut self) {
        self.paused.store(false, Ordering::Release);
        if let Some(w) = &self.worker {
            let _ = w.wake.write(1);
        }
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        let rings = self.rings.lock().unwrap();
        rings.active.as_ref().map(|(_, q, _)| vec![q.state()])
    }

    fn save(&self) -> BlockState {
        BlockState {
            path: self.path.display().to_string(),
            readonly: self.readonly,
            sectors: self.sectors,
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The worker: serve while requests come, then sleep on the eventfd.
fn run(
    rings: &Mutex<Rings>,
    paused: &AtomicBool,
    stop: &AtomicBool,
    notifier: &EventFd,
    wake: &EventFd,
    signals: &DeviceSignals,
    stats: &BlockStats,
) {
    let mut last_work = Instant::now();
    let mut notifications_on = true;
    while !stop.load(Ordering::Acquire) {
        if paused.load(Ordering::Acquire) || signals.is_broken() {
            wait(notifier, wake, IDLE_POLL_MS);
            continue;
        }
        let busy = last_work.elapsed() < BUSY_FOR;
        let more = {
            let mut guard = rings.lock().unwrap();
            let r = &mut *guard;
            if paused.load(Ordering::Acquire) {
                continue;
            }
            let Some((memory, queue, cache)) = r.active.as_mut() else {
                break;
            };
            // While polling the guest need not notify; before sleeping it
            // must, and a request that slipped in meanwhile is served.
            let toggled = if busy && notifications_on {
                notifications_on = false;
                queue.disable_notification(&*memory).map(|()| false)
            } else if !busy && !notifications_on {
                notifications_on = true;
                queue.enable_notification(&*memory)
            } else {
                Ok(false)
            };
            match toggled.map_err(|e| e.to_string()).and_then(|more| {
                r.backend
                    .serve_queue(queue, memory, *cache)
                    .map(|s| (s, more))
                    .map_err(|e| e.to_string())
            }) {
                Ok((served, more)) => {
                    stats
                        .requests
                        .fetch_add(served.requests as u64, Ordering::Relaxed);
                    stats
                        .io_errors
                        .fetch_add(served.io_errors as u64, Ordering::Relaxed);
                    if served.notify {
                        signals.used_buffer();
                    }
                    served.requests > 0 || more
                }
                Err(why) => {
                    signals.mark_broken(&why);
                    false
                }
            }
        };
        if more {
            last_work = Instant::now();
        } else if busy {
            std::thread::sleep(BUSY_POLL);
        } else {
            wait(notifier, wake, IDLE_POLL_MS);
        }
    }
}

/// Sleeps until the guest notifies, the device is woken, or `ms` pass.
fn wait(notifier: &EventFd, wake: &EventFd, ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: notifier.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfd for the call's duration.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    // Drain both (non-blocking): a notification only says "look".
    let _ = notifier.read();
    let _ = wake.read();
}
