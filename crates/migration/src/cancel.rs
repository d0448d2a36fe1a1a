//! The one place an operator's cancel and the engine's point of no return
//! meet. A cancel and the seal the engine sets when its blackout (or its
//! switch to post-copy) begins race for the same word: whichever wins the
//! compare-and-swap decides, so a cancel is either accepted, and the VM
//! stays on the source, or refused, and the migration goes on to its
//! commit; never accepted and then overtaken by the commit.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

const OPEN: u8 = 0;
const CANCELLED: u8 = 1;
const SEALED_BLACKOUT: u8 = 2;
const SEALED_POSTCOPY: u8 = 3;

/// Why the engine no longer takes a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sealed {
    /// The blackout has begun: the VM is paused for its last pages and the
    /// commit follows.
    Blackout,
    /// The VM moves to the destination before the rest of its memory.
    Postcopy,
}

impl Sealed {
    /// What an operator reads when their cancel is refused.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Blackout => "the blackout has begun: the migration is committing and the VM will run on the destination",
            Self::Postcopy => "post-copy in progress: cancelling would lose the VM (it runs on the destination while part of its memory is still here)",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Blackout => SEALED_BLACKOUT,
            Self::Postcopy => SEALED_POSTCOPY,
        }
    }

    fn of(code: u8) -> Option<Self> {
        match code {
            SEALED_BLACKOUT => Some(Self::Blackout),
            SEALED_POSTCOPY => Some(Self::Postcopy),
            _ => None,
        }
    }
}

/// What a cancel got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The engine will stop before its blackout; the VM stays on the source.
    Accepted,
    /// Too late: the engine sealed first.
    Refused(Sealed),
}

/// The engine's seal lost: a cancel came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelledFirst;

/// One migration's cancel state: Open, then Cancelled or Sealed, once.
#[derive(Debug, Default)]
pub struct CancelState(AtomicU8);

impl CancelState {
    pub fn new() -> Self {
        Self::default()
    }

    /// An operator's cancel. Repeating an accepted cancel is accepted
    /// again; nothing undoes a seal.
    pub fn cancel(&self) -> Verdict {
        match self
            .0
            .compare_exchange(OPEN, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(CANCELLED) => Verdict::Accepted,
            Err(code) => Verdict::Refused(Sealed::of(code).expect("only seals besides cancel")),
        }
    }

    /// The engine passes its point of no return. Fails if a cancel came
    /// first: the engine must then abort with the VM running here. Sealing
    /// again (a post-copy switch after a seal) keeps the first seal.
    pub fn seal(&self, at: Sealed) -> Result<(), CancelledFirst> {
        match self
            .0
            .compare_exchange(OPEN, at.code(), Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(()),
            Err(CANCELLED) => Err(CancelledFirst),
            Err(_) => Ok(()),
        }
    }

    /// True once a cancel has been accepted: the engine stops at its next
    /// check.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// The seal, if the engine has passed its point of no return.
    pub fn sealed(&self) -> Option<Sealed> {
        Sealed::of(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn a_cancel_before_the_seal_wins_and_the_seal_fails() {
        let s = CancelState::new();
        assert!(!s.is_cancelled());
        assert_eq!(s.cancel(), Verdict::Accepted);
        assert!(s.is_cancelled());
        assert_eq!(s.cancel(), Verdict::Accepted, "a repeated cancel");
        assert_eq!(s.seal(Sealed::Blackout), Err(CancelledFirst));
        assert_eq!(s.seal(Sealed::Postcopy), Err(CancelledFirst));
        assert_eq!(s.sealed(), None);
    }

    #[test]
    fn a_seal_before_the_cancel_refuses_it_with_its_reason() {
        let s = CancelState::new();
        assert_eq!(s.seal(Sealed::Blackout), Ok(()));
        assert_eq!(s.cancel(), Verdict::Refused(Sealed::Blackout));
        assert!(!s.is_cancelled());
        // A second seal keeps the first.
        assert_eq!(s.seal(Sealed::Postcopy), Ok(()));
        assert_eq!(s.sealed(), Some(Sealed::Blackout));
        assert_eq!(s.cancel(), Verdict::Refused(Sealed::Blackout));

        let p = CancelState::new();
        assert_eq!(p.seal(Sealed::Postcopy), Ok(()));
        assert_eq!(p.cancel(), Verdict::Refused(Sealed::Postcopy));
        assert!(Sealed::Postcopy.reason().contains("post-copy"));
    }

    /// A cancel and a seal racing from two threads, many times: exactly
    /// one of them wins each time, and the two sides agree on which.
    #[test]
    fn racing_cancel_and_seal_agree_on_one_winner() {
        let (mut cancels, mut seals) = (0, 0);
        for _ in 0..2000 {
            let s = Arc::new(CancelState::new());
            let go = Arc::new(Barrier::new(2));
            let canceller = {
                let (s, go) = (s.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    s.cancel()
                })
            };
            go.wait();
            let sealed = s.seal(Sealed::Blackout);
            let verdict = canceller.join().unwrap();
            match (verdict, sealed) {
                (Verdict::Accepted, Err(CancelledFirst)) => cancels += 1,
                (Verdict::Refused(Sealed::Blackout), Ok(())) => seals += 1,
                other => panic!("both or neither won: {other:?}"),
            }
        }
        assert_eq!(cancels + seals, 2000);
    }
}
