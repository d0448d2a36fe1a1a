//! Post-copy: the VM moves first and its memory follows. The source pauses
//! for good, hands over the state and the set of pages the destination
//! lacks, and the destination resumes at once. A vCPU that touches a page
//! not yet there waits in the kernel (userfaultfd) while the destination
//! asks the source for it on the fault channel, a connection of its own so
//! that the answer never queues behind the background push, which sends
//! every remaining page on the main connection, nearest to the latest
//! fault first. Each page crosses at most once (plus an occasional
//! duplicate when a request and the push cross), so post-copy finishes
//! whatever rate the guest writes at. The frames that reached the VM's
//! old place since the pause travel between the pushed pages (v11).

pub(crate) mod channel;
pub mod destination;
pub mod latency;
mod net_intake;
pub mod source;

pub use destination::{PostcopyError, PostcopyHandle};
