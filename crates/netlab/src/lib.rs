//! The network lab of issue 15: builds the test topology (client, switch
//! bridge, a bridge and a tap per simulated host, each in its own network
//! namespace) with `scripts/net-topology.sh`, runs code inside those
//! namespaces, probes a server across a migration (one TCP connection and
//! UDP echoes every millisecond), reads where the switch has learnt a MAC,
//! and provides a stand-in echo server so all of it is tested without a VM.

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
pub use tap::open_tap;
pub use topology::{
    ClientNames, FdbPlace, Host, HostNames, StandInNames, SwitchNames, Topology, TopologyNames,
    TopologyState,
};
