//! A blocking client of a VM's API socket: one request, progress lines, one
//! final answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Request, Response};

/// How long a client waits for the VM's owner to answer one line; a
/// migration sends a progress line at least this often.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest answer line accepted (a migration report with its timeline).
const MAX_ANSWER: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach a VM at {} (is `ferry run --api` running?): {source}", .socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the VM at {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM at {} closed the connection without answering", .socket.display())]
    NoAnswer { socket: PathBuf },
    #[error("the VM's answer is not valid JSON: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Sends one request to a VM's API socket and returns its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    call_with_progress(socket, request, |_| {})
}

/// Like [`call`], handing every progress line to `on_progress` first.
pub fn call_with_progress(
    socket: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&Response),
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT + Duration::from_secs(5)))
        .map_err(io)?;
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        (&mut reader)
            .take(MAX_ANSWER)
            .read_line(&mut line)
            .map_err(io)?;
        if line.is_empty() {
            return Err(ClientError::NoAnswer {
                socket: socket.to_owned(),
            });
        }
        let response: Response = serde_json::from_str(line.trim())?;
        if response.is_final() {
            return Ok(response);
        }
        on_progress(&response);
    }
}
