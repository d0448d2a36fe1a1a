//! What can go wrong in the network lab, each saying what to do about it.

use std::io;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    #[error("bad topology prefix {prefix:?}: {reason}")]
    BadPrefix {
        prefix: String,
        reason: &'static str,
    },

    #[error("bad subnet index {0}: use 0-254 (the N of 10.77.N.0/24)")]
    BadSubnetIndex(u16),

    #[error("bad network namespace name {0:?}: expected a name under /run/netns without '/'")]
    BadNamespaceName(String),

    #[error("bad MAC address {0:?}: expected six hex bytes like 02:00:00:00:00:01")]
    BadMac(String),

    #[error("the network topology cannot run here: {0}")]
    Unsupported(String),

    #[error("could not start `{command}`: {source}")]
    Spawn { command: String, source: io::Error },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("`{command}` printed output netlab cannot read ({reason}): {output}")]
    BadOutput {
        command: String,
        reason: String,
        output: String,
    },

    #[error("cannot enter network namespace {ns} ({path}); is the topology up? {source}")]
    EnterNetns {
        ns: String,
        path: String,
        source: io::Error,
    },

    #[error("could not start a thread for network namespace {ns}: {source}")]
    Thread { ns: String, source: io::Error },

    #[error("{what} in network namespace {ns}: {source}")]
    Io {
        ns: String,
        what: String,
        source: io::Error,
    },

    #[error("no TCP connection to {target} from namespace {ns} within {timeout_ms} ms (is the server listening there?): {source}")]
    Connect {
        ns: String,
        target: SocketAddr,
        timeout_ms: u64,
        source: io::Error,
    },

    #[error("bad probe configuration: {0}")]
    BadProbeConfig(&'static str),

    #[error("the stand-in is already on host {0}")]
    AlreadyThere(crate::Host),
}
