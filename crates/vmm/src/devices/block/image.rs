//! The raw image file behind a virtio-blk device: opened with O_DIRECT
//! so that no host page cache holds data another host cannot see (shared
//! storage) and a write the guest saw acknowledged is on the device, not
//! in this host's memory. Where the filesystem refuses O_DIRECT (tmpfs,
//! some FUSE), the image is opened normally and, when the device is
//! activated, flushed (fdatasync) and its cache dropped
//! (posix_fadvise DONTNEED), so it starts from what the storage holds; the
//! log says which mode is in use.
//!
//! O_DIRECT needs aligned buffers, offsets and lengths: every transfer
//! goes through an aligned bounce buffer, and offsets and lengths are
//! whole 512-byte sectors (a filesystem whose logical block is larger
//! refuses a misaligned request, which the guest sees as an I/O error).

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::lock::{self, LockError};

/// Alignment of the bounce buffer (a page: enough for any logical block).
const ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("disk image {path} does not exist")]
    Missing { path: PathBuf },
    #[error("disk image {path} cannot be opened for writing ({source}); pass readonly to use it read-only")]
    ReadOnly { path: PathBuf, source: io::Error },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is {actual} bytes, but the VM's definition says {expected}")]
    WrongSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("disk image {path} is {size} bytes: not a whole number of 512-byte sectors, or empty")]
    BadSize { path: PathBuf, size: u64 },
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot flush disk image {path}: {source}")]
    Flush { path: PathBuf, source: io::Error },
}

/// How the image's data reaches the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT: no host page cache.
    Direct,
    /// The page cache, flushed and dropped on activation (the filesystem
    /// refused O_DIRECT).
    Buffered,
}

/// What to open and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub readonly: bool,
    /// The size the VM's definition gives the disk; `None` takes the
    /// file's.
    pub expected_size: Option<u64>,
}

/// An open image.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    mode: CacheMode,
    locked: bool,
}

impl Image {
    /// Opens the image, checks its size and, with `take_lock`, takes the
    /// exclusive lock (a destination on shared storage opens it without
    /// and takes it at the commit). Nothing is written.
    pub fn open(spec: &ImageSpec, take_lock: bool) -> Result<Image, ImageError> {
        Self::open_with(spec, take_lock, true)
    }

    /// [`open`](Self::open), trying O_DIRECT only with `try_direct` (the
    /// buffered path is tested on filesystems that do O_DIRECT too).
    fn open_with(spec: &ImageSpec, take_lock: bool, try_direct: bool) -> Result<Image, ImageError> {
        let path = spec.path.clone();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::Missing { path })
            }
            Err(source) => return Err(ImageError::Open { path, source }),
        };
        if !meta.is_file() {
            return Err(ImageError::NotAFile { path });
        }
        let size = meta.len();
        if size == 0 || size % 512 != 0 {
            return Err(ImageError::BadSize { path, size });
        }
        if let Some(expected) = spec.expected_size {
            if expected != size {
                return Err(ImageError::WrongSize {
                    path,
                    actual: size,
                    expected,
                });
            }
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!spec.readonly);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(&path)
        };
        let first = if try_direct {
            open(true)
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        };
        let (file, mode) = match first {
            Ok(file) => (file, CacheMode::Direct),
            // EINVAL: this filesystem does not do O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match open(false) {
                Ok(file) => (file, CacheMode::Buffered),
                Err(source) => return Err(open_error(path, spec.readonly, source)),
            },
            Err(source) => return Err(open_error(path, spec.readonly, source)),
        };
        let mut image = Image {
            file,
            path,
            size,
            readonly: spec.readonly,
            mode,
            locked: false,
        };
        if take_lock {
            image.lock()?;
        }
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sectors(&self) -> u64 {
        self.size / 512
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// A second descriptor on the same open file (so with the same
    /// O_DIRECT choice), for a reader beside the device.
    pub(super) fn duplicate(&self) -> Result<File, ImageError> {
        self.file.try_clone().map_err(|source| ImageError::Open {
            path: self.path.clone(),
            source,
        })
    }

    /// Takes the exclusive lock, or a shared one for a read-only image
    /// (no-op if held).
    pub fn lock(&mut self) -> Result<(), LockError> {
        if self.readonly {
            lock::take_shared(&self.file, &self.path)?;
        } else {
            lock::take(&self.file, &self.path)?;
        }
        self.locked = true;
        Ok(())
    }

    /// Gives the lock back (no-op if not held).
    pub fn unlock(&mut self) -> Result<(), LockError> {
        if self.locked {
            lock::release(&self.file, &self.path)?;
            self.locked = false;
        }
        Ok(())
    }

    /// Called when the guest's driver starts the device: a buffered image
    /// is flushed and its page cache dropped, so reads come from what the
    /// storage holds (another host may have written it).
    pub fn activate(&self) -> Result<(), ImageError> {
        match self.mode {
            CacheMode::Direct => {
                tracing::info!(path = %self.path.display(), "disk image opened with O_DIRECT");
            }
            CacheMode::Buffered => {
                self.flush()?;
                // SAFETY: posix_fadvise only advises the kernel about the
                // open descriptor's cached pages; offset 0, length 0 = the
                // whole file.
                let rc = unsafe {
                    libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(ImageError::Flush {
                        path: self.path.clone(),
                        source: io::Error::from_raw_os_error(rc),
                    });
                }
                tracing::warn!(
                    path = %self.path.display(),
                    "the filesystem refuses O_DIRECT: disk image opened through the page cache, flushed and dropped on activation"
                );
            }
        }
        Ok(())
    }

    /// fdatasync: every acknowledged write is on the storage.
    pub fn flush(&self) -> Result<(), ImageError> {
        self.file.sync_data().map_err(|source| ImageError::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (both checked by the caller to
    /// lie inside the image) into `buf`, which must be aligned.
    pub(super) fn read_aligned(&self, buf: &mut Bounce, len: usize, offset: u64) -> io::Result<()> {
        self.file
            .read_exact_at(&mut buf.as_mut_slice()[..len], offset)
    }

    /// Writes the first `len` bytes of `buf` at `offset`.
    pub(super) fn write_aligned(&self, buf: &Bounce, len: usize, offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.file.write_all_at(&buf.as_slice()[..len], offset)
    }
}

fn open_error(path: PathBuf, readonly: bool, source: io::Error) -> ImageError {
    match source.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) if !readonly => {
            ImageError::ReadOnly { path, source }
        }
        _ => ImageError::Open { path, source },
    }
}

/// A page-aligned buffer for O_DIRECT transfers.
pub struct Bounce {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: Bounce owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for Bounce {}

impl Bounce {
    /// `len` bytes (rounded up to the alignment), zeroed.
    pub fn new(len: usize) -> Bounce {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(len, ALIGN).expect("a bounce buffer's layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Bounce { ptr, len }
    }

    /// Bytes it holds.
    pub fn capacity(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("a bounce buffer's layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::scratch::Scratch;

    fn spec(path: &Path, expected: Option<u64>) -> ImageSpec {
        ImageSpec {
            path: path.to_owned(),
            readonly: false,
            expected_size: expected,
        }
    }

    #[test]
    fn opens_checks_and_locks() {
        let dir = Scratch::new("image-open");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let mut a = Image::open(&spec(&path, Some(1 << 20)), true).unwrap();
        eprintln!("cache mode here: {:?}", a.mode());
        assert_eq!(
            (a.size(), a.sectors(), a.is_locked()),
            (1 << 20, 2048, true)
        );
        a.activate().unwrap();
        // A second VM on the same image is refused, and nothing changed.
        let err = Image::open(&spec(&path, None), true).unwrap_err();
        assert!(
            matches!(err, ImageError::Lock(LockError::Held { .. })),
            "{err}"
        );
        // Without the lock (a destination on shared storage) it opens.
        let mut b = Image::open(&spec(&path, None), false).unwrap();
        assert!(b.lock().is_err());
        a.unlock().unwrap();
        b.lock().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 1 << 20]);
    }

    #[test]
    fn the_buffered_fallback_flushes_and_drops_the_cache() {
        let dir = Scratch::new("image-buffered");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let img = Image::open_with(&spec(&path, Some(8192)), true, false).unwrap();
        assert_eq!(img.mode(), CacheMode::Buffered);
        img.activate().unwrap();
        let mut buf = Bounce::new(4096);
        img.read_aligned(&mut buf, 4096, 4096).unwrap();
        assert!(buf.as_slice().iter().all(|&b| b == 1));
        buf.as_mut_slice().fill(2);
        img.write_aligned(&buf, 512, 0).unwrap();
        img.flush().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap()[..513],
            [&[2u8; 512][..], &[1]].concat()
        );
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let dir = Scratch::new("image-bad");
        let missing = dir.path().join("missing.img");
        let err = Image::open(&spec(&missing, None), true).unwrap_err();
        assert!(matches!(err, ImageError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("missing.img"));

        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let err = Image::open(&spec(&path, Some(4096)), true).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::WrongSize {
                    actual: 8192,
                    expected: 4096,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("8192") && err.to_string().contains("4096"));

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            Image::open(&spec(&odd, None), true),
            Err(ImageError::BadSize { size: 1000, .. })
        ));

        let err = Image::open(&spec(dir.path(), None), true).unwrap_err();
        assert!(matches!(err, ImageError::NotAFile { .. }), "{err}");

        // Read-only on disk, asked for read-write: refused (root ignores
        // file modes, so only check the message shape there).
        let ro = dir.path().join("ro.img");
        std::fs::write(&ro, vec![0u8; 4096]).unwrap();
        let mut perms = std::fs::metadata(&ro).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&ro, perms).unwrap();
        match Image::open(&spec(&ro, None), true) {
            Err(e @ ImageError::ReadOnly { .. }) => assert!(e.to_string().contains("readonly")),
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => eprintln!("running as root: a read-only file mode does not stop a write open"),
        }
        let readonly = ImageSpec {
            readonly: true,
            ..spec(&ro, None)
        };
        let img = Image::open(&readonly, true).unwrap();
        assert!(img.readonly());
    }
}
