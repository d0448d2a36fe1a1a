//! COM1: vm-superio's 16550 with output cut into lines for the VM's owner.
//! The guest sends a whole line per `rep outsb`, one exit per line.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::time::Instant;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::events::{ConsoleLine, VmEvent};

/// Longest line kept; a guest that never sends a newline cannot grow us.
const MAX_LINE: usize = 4096;

/// Raises COM1's interrupt through an irqfd (GSI 4).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Collects bytes into lines and hands each complete line on.
pub struct LineSink {
    partial: Vec<u8>,
    events: Sender<VmEvent>,
}

impl LineSink {
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self {
            partial: Vec::with_capacity(256),
            events,
        }
    }

    /// Continues a line another VMM started (snapshot, migration), so a
    /// line cut by the pause arrives whole.
    pub fn with_pending(events: Sender<VmEvent>, pending: &[u8]) -> Self {
        let mut sink = Self::new(events);
        sink.partial
            .extend_from_slice(&pending[..pending.len().min(MAX_LINE)]);
        sink
    }

    /// The bytes of a line not yet ended.
    pub fn pending(&self) -> &[u8] {
        &self.partial
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_string();
        self.partial.clear();
        // A dropped receiver means nobody listens any more; the guest must
        // not be stopped for that.
        let _ = self.events.send(VmEvent::Console(ConsoleLine {
            at: Instant::now(),
            text,
        }));
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' || self.partial.len() >= MAX_LINE {
                self.emit();
                if b == b'\n' {
                    continue;
                }
            }
            self.partial.push(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub type ConsoleSerial = Serial<IrqLine, NoEvents, LineSink>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_become_lines() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sink = LineSink::new(tx);
        sink.write_all(b"HB seq=1\r\nREA").unwrap();
        sink.write_all(b"DY\n").unwrap();
        let lines: Vec<String> = rx
            .try_iter()
            .map(|e| match e {
                VmEvent::Console(l) => l.text,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, vec!["HB seq=1", "READY"]);
    }
}
