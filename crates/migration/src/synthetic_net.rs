//! A network card for the synthetic guests: frames that reach the VM's
//! old place wait in a queue, as a held card's do; the new place records
//! what was delivered into the "guest", and how many frames were in when
//! its own network opened. No taps: it proves the engine's handover
//! logic, never a real card.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::guest::GuestError;
use crate::handover::{DestinationNetwork, SourceNetwork};

/// The old place: a test adds frames (held or stray) with `arrive`.
#[derive(Clone, Default)]
pub struct OldPlace(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl OldPlace {
    pub fn arrive(&self, frame: &[u8]) {
        self.0.lock().unwrap().push_back(frame.to_vec());
    }

    /// Frames still waiting (not taken by the forwarding).
    pub fn waiting(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl SourceNetwork for OldPlace {
    fn take_waiting(&mut self, max: usize) -> Result<Vec<Vec<u8>>, GuestError> {
        let mut q = self.0.lock().unwrap();
        let n = q.len().min(max);
        Ok(q.drain(..n).collect())
    }
}

/// What the new place's card saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    pub delivered: Vec<Vec<u8>>,
    /// Frames delivered when this host's network was opened; None: never.
    pub opened_after: Option<usize>,
    /// Times it was opened (once is right).
    pub opens: u32,
}

#[derive(Clone, Default)]
pub struct NewPlace(Arc<Mutex<Seen>>);

impl NewPlace {
    pub fn seen(&self) -> Seen {
        self.0.lock().unwrap().clone()
    }
}

impl DestinationNetwork for NewPlace {
    fn deliver(&mut self, frame: Vec<u8>) -> Result<(), GuestError> {
        self.0.lock().unwrap().delivered.push(frame);
        Ok(())
    }

    fn open(&mut self) -> Result<(), GuestError> {
        let mut seen = self.0.lock().unwrap();
        seen.opens += 1;
        if seen.opened_after.is_none() {
            seen.opened_after = Some(seen.delivered.len());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "synthetic_net_tests.rs"]
mod tests;
