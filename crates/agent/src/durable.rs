//! JSON files under the state directory that outlive a killed agent:
//! each written to a temporary file, synced and renamed, so a crash
//! leaves the old version or the new one, never half of either.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes `value` as `dir/NAME.json` durably (temporary file, fsync,
/// rename, fsync of the directory).
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{name}.json")))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Every `*.json` in `dir` that decodes as `T`; unreadable files are
/// logged (naming `what`) and skipped.
pub fn read_all_json<T: DeserializeOwned>(dir: &Path, what: &str) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => out.push(v),
            Err(e) => tracing::error!("{what} file {}: {e}; skipped", path.display()),
        }
    }
    out
}
