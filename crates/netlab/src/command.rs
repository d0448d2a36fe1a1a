//! Runs the system tools the lab is built from (ip, bridge, the topology
//! script), turning a failure into an error that names the command and
//! carries its stderr.

use std::process::Command;

use crate::NetlabError;

/// Where iproute2 lives on Debian, appended to PATH so the tools are found
/// even from an environment whose PATH lacks the sbin directories.
const SBIN_PATH: &str = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin";

/// Runs `program args…` and returns its stdout; a non-zero exit is an error
/// carrying the stderr. `shown` is how the command appears in messages.
pub(crate) fn run_shown(program: &str, args: &[&str], shown: &str) -> Result<String, NetlabError> {
    let path = match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{p}:{SBIN_PATH}"),
        _ => SBIN_PATH.to_string(),
    };
    let output = Command::new(program)
        .args(args)
        .env("PATH", path)
        .output()
        .map_err(|source| NetlabError::Spawn {
            command: shown.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetlabError::Command {
            command: shown.to_string(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args…`, shown as typed.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, NetlabError> {
    let shown = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    run_shown(program, args, &shown)
}

/// Finds `program` in PATH or the sbin directories.
pub(crate) fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(SBIN_PATH.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}
