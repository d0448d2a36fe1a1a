//! Writing and reading the identity files: secrets are created with mode
//! 0600 from their first instant (never chmod-ed afterwards), and a set of
//! files is either all written or none is.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private key file.
pub(crate) const SECRET_MODE: u32 = 0o600;
/// Mode of a certificate file.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// Creates `dir` (and its parents) if missing; a directory this creates is
/// mode 0700, since it will hold a private key.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `bytes` to a new file `path` created with `mode`; fails with
/// `AlreadyExists` rather than replace a file.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if written.is_err() {
        // A half-written file would be worse than none.
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!("could not remove the half-written {}: {e}", path.display());
        }
    }
    written
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", path.display());
        }
    }
}

/// Writes every `(path, bytes, mode)`. With `replace` false none of the
/// paths may exist yet, and on failure the files this call created are
/// removed. With `replace` true each file is first written beside its
/// target and the set is then renamed into place, so a failure while
/// writing leaves the old files as they were.
pub(crate) fn write_set(files: &[(&Path, &[u8], u32)], replace: bool) -> io::Result<()> {
    let mut created: Vec<PathBuf> = Vec::new();
    let fail = |created: &[PathBuf], e| {
        for done in created {
            remove_quietly(done);
        }
        Err(e)
    };
    for &(path, bytes, mode) in files {
        let target = if replace {
            temp_path(path)
        } else {
            path.to_path_buf()
        };
        if replace {
            // A stale temporary from a crashed run would make create_new fail.
            remove_quietly(&target);
        }
        if let Err(e) = write_new(&target, bytes, mode) {
            return fail(&created, e);
        }
        created.push(target);
    }
    if replace {
        for (tmp, &(path, _, _)) in created.iter().zip(files) {
            fs::rename(tmp, path)?;
        }
    }
    Ok(())
}

/// The permission bits of `path` if group or others may read or write it.
pub(crate) fn insecure_mode(path: &Path) -> io::Result<Option<u32>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}
