//! The destination's post-copy takes the VM's forwarded frames (v11) off
//! the main connection, between the pushed pages, and hands them to the
//! card as they come; this host's network opens at the held-done mark, or
//! when anything goes wrong (the link fails, the source breaks the
//! protocol, its window and a grace period pass), since the VM runs here
//! either way.

use std::sync::Mutex;

use crate::handover::{DeliverReport, Delivery, DestinationNetwork, ForwardLimits};
use crate::protocol::Message;

/// The delivery, when the VM has a card here and the source forwards.
pub(crate) struct NetIntake(Mutex<Option<Delivery<'static>>>);

impl NetIntake {
    pub(crate) fn new(net: Option<Box<dyn DestinationNetwork>>) -> Self {
        let limits = ForwardLimits::default();
        Self(Mutex::new(net.map(|n| Delivery::new(n, &limits))))
    }

    pub(crate) fn present(&self) -> bool {
        self.0.lock().unwrap().is_some()
    }

    /// True while forwarded frames may still come.
    pub(crate) fn expecting(&self) -> bool {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(Delivery::expecting)
    }

    /// Delivers a forwarded-frames message (dropped when the VM has no
    /// card here: a frame is never worth the post-copy); any other message
    /// is handed back.
    pub(crate) fn take(&self, message: Message) -> Result<(), Message> {
        let mut guard = self.0.lock().unwrap();
        let Some(delivery) = guard.as_mut() else {
            return match message {
                Message::Forwarded(_) | Message::ForwardEnd(_) => Ok(()),
                other => Err(other),
            };
        };
        match message {
            Message::Forwarded(f) => {
                if let Err(e) = delivery.forwarded(f) {
                    delivery.give_up(crate::precopy::error_chain(&e));
                }
                Ok(())
            }
            Message::ForwardEnd(end) => {
                delivery.ended(&end);
                Ok(())
            }
            other => Err(other),
        }
    }

    /// Opens this host's network once the source's time is up.
    pub(crate) fn check_deadline(&self) {
        if let Some(d) = self.0.lock().unwrap().as_mut() {
            d.check_deadline();
        }
    }

    /// No more frames will be delivered: this host's network opens now
    /// (if it is not open yet), and `why` goes in the report.
    pub(crate) fn give_up(&self, why: &str) {
        if let Some(d) = self.0.lock().unwrap().as_mut().filter(|d| d.expecting()) {
            d.give_up(why.to_string());
        }
    }

    pub(crate) fn report(&self) -> Option<DeliverReport> {
        self.0.lock().unwrap().as_ref().map(|d| d.report().clone())
    }
}
