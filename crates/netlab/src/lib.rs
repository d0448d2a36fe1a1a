//! The network lab of issue 15: builds the test topology (client, switch
//! bridge, a bridge and a tap per simulated host, each in its own network
//! namespace) with `scripts/net-topology.sh`, runs code inside those
//! namespaces, probes a server across a migration (one TCP connection and
//! UDP echoes every millisecond), reads where the switch has learnt a MAC,
//! and provides a stand-in echo server so all of it is tested without a VM.
//!
//! ```no_run
//! use ferry_netlab::{FdbPlace, Host, Probe, ProbeConfig, StandIn, Topology};
//!
//! if let Some(why) = Topology::skip_reason() {
//!     eprintln!("SKIPPED: {why}");
//!     return;
//! }
//! let topo = Topology::up("mytest-1").unwrap(); // removed when dropped
//! // A VMM would open topo.host(Host::A).tap in topo.host(Host::A).ns and
//! // serve on topo.guest_ip(); the stand-in does the same without a VM.
//! let mut vm = StandIn::start(&topo, 7000).unwrap();
//! let probe = Probe::start_on(&topo, 7000, ProbeConfig::default()).unwrap();
//! vm.move_to(Host::B).unwrap();
//! vm.announce().unwrap();
//! // Within milliseconds the switch has learnt the new place:
//! let place = topo.fdb_place(vm.mac()).unwrap(); // Some(FdbPlace::HostB)
//! # let _ = place == Some(FdbPlace::HostB);
//! let report = probe.stop();
//! println!("{report}{}", serde_json::to_string(&report).unwrap());
//! ```

mod announce;
mod command;
mod error;
mod mac;
mod netns;
mod probe;
mod standin;
mod tap;
mod topology;

pub use announce::{garp_frame, rarp_frame, send_frames, ANNOUNCE_FRAME_LEN};
pub use error::NetlabError;
pub use mac::MacAddr;
pub use netns::in_netns;
pub use probe::{GapReport, Probe, ProbeConfig, ProbeReport, TcpReport, UdpReport};
pub use standin::{StandIn, StandInCounters};
pub use tap::{open_tap, open_tap_here};
pub use topology::{
    ClientNames, FdbPlace, Host, HostNames, StandInNames, SwitchNames, Topology, TopologyNames,
    TopologyState,
};
