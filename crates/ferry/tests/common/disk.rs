//! Disks as the migration tests use them: an image file, the guest's disk
//! counters on a `ferry` child's console, and who holds the image's lock,
//! read from the outside (a third process) through /proc.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_testguest::console::{parse_line, DiskCounters, Line};

use super::{FerryProc, Stream, TempDir};

/// An image of `mb` MiB plus one spare MiB, full of junk from "an earlier
/// user" (0xa5).
pub fn image(dir: &TempDir, name: &str, mb: u64) -> String {
    let path = dir.path(name);
    let file = std::fs::File::create(&path).unwrap();
    file.write_all_at(&vec![0xa5; ((mb + 1) << 20) as usize], 0)
        .unwrap();
    file.sync_all().unwrap();
    path
}

/// Reads `vm`'s console until a heartbeat's disk counters satisfy
/// `until`; every heartbeat must show no disk error.
pub fn wait_disk(
    vm: &mut FerryProc,
    timeout: Duration,
    what: &str,
    until: impl Fn(&DiskCounters) -> bool,
) -> DiskCounters {
    let name = vm.name.clone();
    vm.wait_line(timeout, what, |s, text| {
        assert!(!text.starts_with("DERR"), "{name}: {text}");
        if s != Stream::Out || !matches!(parse_line(text), Line::Heartbeat(_)) {
            return None;
        }
        let d = DiskCounters::from_heartbeat(text)
            .unwrap_or_else(|| panic!("{name}: a heartbeat without disk fields: {text}"));
        assert_eq!(d.disk_err, 0, "{name}: disk errors: {text}");
        until(&d).then_some(d)
    })
}

/// The fdinfo file of the descriptor through which process `pid` has
/// `image` (its canonical path) open, if any.
fn image_fdinfo(pid: u32, image: &Path) -> Option<PathBuf> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten().find_map(|fd| {
        let target = std::fs::read_link(fd.path()).ok()?;
        (target == image).then(|| {
            PathBuf::from(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
        })
    })
}

/// Whether the descriptor behind `fdinfo` holds a lock (a `lock:` line).
fn fdinfo_shows_lock(fdinfo: &Path) -> bool {
    std::fs::read_to_string(fdinfo).is_ok_and(|info| info.lines().any(|l| l.starts_with("lock:")))
}

/// Whether process `pid` holds a lock on `image` (its canonical path)
/// through the descriptor it opened it with. A process that has gone
/// holds nothing.
pub fn holds_lock(pid: u32, image: &Path) -> bool {
    image_fdinfo(pid, image).is_some_and(|f| fdinfo_shows_lock(&f))
}

/// One process's side of the watch: its image descriptor, found once.
struct Holder {
    pid: u32,
    fdinfo: Option<PathBuf>,
}

impl Holder {
    fn holds(&mut self, image: &Path) -> bool {
        if self.fdinfo.is_none() {
            self.fdinfo = image_fdinfo(self.pid, image);
        }
        self.fdinfo.as_deref().is_some_and(fdinfo_shows_lock)
    }
}

/// What [`LockWatch`] saw: every change of who held the lock, with when.
#[derive(Debug, Clone)]
pub struct LockTimeline {
    /// (time since the watch began, source holds, destination holds)
    pub changes: Vec<(Duration, bool, bool)>,
    pub polls: u64,
    /// How long the watch ran.
    pub watched: Duration,
}

impl LockTimeline {
    /// Panics if both ever held it at once.
    pub fn assert_never_held_twice(&self) {
        assert!(
            !self.changes.iter().any(|&(_, a, b)| a && b),
            "the image's lock was held by both sides at once: {self:?}"
        );
    }

    /// From the source's release to the destination's take: zero when no
    /// poll fell between them (the hand-over was shorter than one poll);
    /// None if the lock never went from the source to the destination.
    pub fn handover_gap(&self) -> Option<Duration> {
        let taken = self.changes.iter().position(|&(_, _, dst)| dst)?;
        let held = self.changes[..taken].iter().rposition(|&(_, src, _)| src)?;
        Some(match self.changes.get(held + 1) {
            Some(released) if held + 1 < taken => self.changes[taken].0 - released.0,
            _ => Duration::ZERO,
        })
    }

    /// The mean time one poll took: the resolution of the timeline.
    pub fn poll_interval(&self) -> Duration {
        self.watched / self.polls.max(1) as u32
    }
}

/// A thread of this (third) process that polls, until stopped, which of
/// the two processes holds the image's lock.
pub struct LockWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<LockTimeline>>,
}

impl LockWatch {
    pub fn start(image: &str, source: u32, destination: u32) -> Self {
        let image: PathBuf = std::fs::canonicalize(image).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut timeline = LockTimeline {
                changes: Vec::new(),
                polls: 0,
                watched: Duration::ZERO,
            };
            let mut last = None;
            let (mut src, mut dst) = (
                Holder {
                    pid: source,
                    fdinfo: None,
                },
                Holder {
                    pid: destination,
                    fdinfo: None,
                },
            );
            // Bounded: the test stops it; at worst 10 minutes.
            while !flag.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(600) {
                // The two reads are not one instant: the source is read
                // before and after the destination, and counts as holding
                // at the destination's read only if it held at both.
                let before = src.holds(&image);
                let dst_holds = dst.holds(&image);
                let after = src.holds(&image);
                let now = (before && after, dst_holds);
                timeline.polls += 1;
                if last != Some(now) {
                    timeline.changes.push((t0.elapsed(), now.0, now.1));
                    last = Some(now);
                }
            }
            timeline.watched = t0.elapsed();
            timeline
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> LockTimeline {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for LockWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Every block of the first `mb` MiB holds its own number and a
/// generation in 1..=`max_gen`; the spare MiB after them is untouched.
pub fn assert_image_blocks(image: &str, mb: u64, max_gen: u64) {
    let file = std::fs::File::open(image).unwrap();
    for b in 0..(mb << 8) {
        let mut head = [0u8; 16];
        file.read_exact_at(&mut head, b * 4096).unwrap();
        let number = u64::from_le_bytes(head[..8].try_into().unwrap());
        let gen = u64::from_le_bytes(head[8..].try_into().unwrap());
        assert_eq!(number, b, "block {b} holds another block's number");
        assert!(
            (1..=max_gen).contains(&gen),
            "block {b}: generation {gen}, want 1..={max_gen}"
        );
    }
    let mut spare = [0u8; 64];
    file.read_exact_at(&mut spare, mb << 20).unwrap();
    assert_eq!(spare, [0xa5; 64], "the spare MiB was written");
}

/// `ferry run` with the disk workload on `img` (`mb` MiB of checked
/// blocks), up and past its first checked block; returns it and its API
/// socket.
pub fn disk_source(dir: &TempDir, img: &str, mb: u64) -> (FerryProc, String) {
    disk_source_with(dir, img, "512M", &format!("dirty:64:10+disk:{mb}:max"))
}

/// [`disk_source`] with `mem` and a `workload` that has a disk term.
pub fn disk_source_with(
    dir: &TempDir,
    img: &str,
    mem: &str,
    workload: &str,
) -> (FerryProc, String) {
    let socket = dir.path("source.sock");
    let disk = format!("path={img}");
    let mut src = FerryProc::spawn(
        "source",
        &[
            "run",
            "--mem",
            mem,
            "--workload",
            workload,
            "--disk",
            &disk,
            "--api",
            &socket,
            "--duration",
            "300s",
        ],
    );
    src.wait_line(Duration::from_secs(60), "READY", |s, text| {
        (s == Stream::Out && matches!(parse_line(text), Line::Ready(_))).then_some(())
    });
    super::wait_for_socket(&socket);
    // A whole written round, and checking under way: what moves is a disk
    // the guest has expectations of.
    wait_disk(&mut src, Duration::from_secs(60), "checked blocks", |d| {
        d.disk_ver > 0
    });
    (src, socket)
}
