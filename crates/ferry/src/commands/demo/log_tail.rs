//! Follows a VM's console log as its agent writes it. The file is held
//! open, so its lines can still be read after the agent removes the VM's
//! directory (as a source agent does once the VM has moved).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often an idle log is looked at again.
const POLL: Duration = Duration::from_millis(20);

pub struct LogTail {
    reader: BufReader<File>,
    partial: String,
}

impl LogTail {
    /// Opens `path`, waiting up to `timeout` for it to appear.
    pub fn open(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match File::open(path) {
                Ok(file) => {
                    return Ok(Self {
                        reader: BufReader::new(file),
                        partial: String::new(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole line, waiting up to `timeout`; None if none came.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.reader.read_line(&mut self.partial) {
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = self.partial.trim_end().to_string();
                    self.partial.clear();
                    return Some(line);
                }
                // End of the file for now (a line may be half written).
                Ok(_) => {}
                Err(_) => return None,
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Every whole line written so far, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_line(Duration::ZERO)).collect()
    }
}
