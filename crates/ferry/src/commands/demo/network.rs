//! `ferry demo network`: the direct demo with the VM's network identity.
//! The VM's virtio-net card sits on host A's tap of the test topology and
//! its guest serves a TCP echo and a UDP echo; a client in its own
//! namespace sends one TCP request and one UDP probe every millisecond,
//! over one connection, from before the migration until a second after it.
//! The verdict needs the connection kept, no request and no probe lost.

use std::time::Duration;

use anyhow::{bail, Context};
use ferry_netlab::{Host, Probe, ProbeConfig, ProbeReport, Topology};

use super::say;
use crate::commands::run::VmArgs;

/// The guest's TCP and UDP echo port.
const PORT: u16 = 7000;
/// Traffic before the migration and after the guest verified on B.
const SETTLE: Duration = Duration::from_secs(1);
/// The probe stops by itself after this long, whatever happens.
const PROBE_LIMIT: Duration = Duration::from_secs(120);

/// What the client saw, for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct NetworkOutcome {
    pub guest_ip: String,
    pub port: u16,
    pub connection_kept: bool,
    pub tcp_requests_sent: u64,
    pub tcp_requests_lost: u64,
    pub tcp_resets: u64,
    pub tcp_longest_reply_gap_ms: Option<f64>,
    pub tcp_retransmissions: u32,
    pub udp_probes_sent: u64,
    pub udp_probes_lost: u64,
    pub udp_longest_gap_ms: Option<f64>,
    pub guest_stall_ms: Option<f64>,
    /// The client's whole report.
    pub probe: ProbeReport,
}

/// The topology, and the client's probe once it runs.
pub struct NetworkScene {
    topology: Topology,
    probe: Option<Probe>,
}

impl NetworkScene {
    /// Builds the topology (namespaces, bridges, taps): root only.
    pub fn up() -> anyhow::Result<Self> {
        if let Some(why) = Topology::skip_reason() {
            bail!("ferry demo network builds network namespaces and taps, and cannot here: {why}");
        }
        let topology = Topology::up(&format!("fnet{}", std::process::id()))
            .context("cannot build the demo's network topology")?;
        Ok(Self {
            topology,
            probe: None,
        })
    }

    /// The VM of the demo with its card on host A's tap and the echoes on.
    pub fn vm_args(&self, base: &VmArgs) -> anyhow::Result<VmArgs> {
        let mut vm = base.clone();
        let workload = format!(
            "{}+net:{}/{}:{PORT}",
            base.workload(),
            self.topology.guest_ip(),
            self.topology.names().prefix_len
        );
        vm.workload = Some(workload.parse().map_err(|e| anyhow::anyhow!("{e}"))?);
        vm.net = Some(self.tap_flag(Host::A).parse()?);
        Ok(vm)
    }

    /// `ferry receive`'s card on host B's tap.
    pub fn host_b_args(&self) -> Vec<String> {
        vec!["--net".into(), self.tap_flag(Host::B)]
    }

    fn tap_flag(&self, host: Host) -> String {
        let h = self.topology.host(host);
        format!("tap={},netns={}", h.tap, h.ns)
    }

    pub fn describe(&self) -> String {
        let n = self.topology.names();
        format!(
            "direct with a network: host A's tap {} in {}, host B's tap {} in {}, the client in {} ({}), the guest at {}:{PORT}",
            n.host_a.tap, n.host_a.ns, n.host_b.tap, n.host_b.ns, n.client.ns, n.client.ip, n.guest_ip
        )
    }

    /// Starts the client once the guest is up, and lets it run a while.
    pub fn start_probe(&mut self, json: bool) -> anyhow::Result<()> {
        let probe = Probe::start_on(
            &self.topology,
            PORT,
            ProbeConfig {
                max_duration: PROBE_LIMIT,
                ..ProbeConfig::default()
            },
        )
        .context("the client cannot reach the guest on host A")?;
        say!(
            json,
            "Client: one TCP request and one UDP probe every 1 ms to {}:{PORT}, over one connection",
            self.topology.guest_ip()
        );
        self.probe = Some(probe);
        std::thread::sleep(SETTLE);
        Ok(())
    }

    /// Lets traffic run on B a while, stops the client, prints what it saw,
    /// and says what failed, if anything. Removes the topology.
    pub fn finish(
        mut self,
        guest_stall_us: Option<u64>,
        json: bool,
    ) -> (NetworkOutcome, Option<String>) {
        std::thread::sleep(SETTLE);
        let report = match self.probe.take() {
            Some(p) => p.stop(),
            None => unreachable!("the probe starts before the migration"),
        };
        let ms = |us: u64| us as f64 / 1e3;
        let tcp = report.tcp.clone();
        let udp = report.udp.clone();
        let outcome = NetworkOutcome {
            guest_ip: self.topology.guest_ip().to_string(),
            port: PORT,
            connection_kept: tcp.as_ref().is_some_and(|t| t.connection_kept),
            tcp_requests_sent: tcp.as_ref().map_or(0, |t| t.requests_sent),
            tcp_requests_lost: tcp.as_ref().map_or(0, |t| t.replies_missing),
            tcp_resets: tcp.as_ref().map_or(0, |t| t.resets),
            tcp_longest_reply_gap_ms: tcp
                .as_ref()
                .and_then(|t| t.longest_gap.as_ref())
                .map(|g| ms(g.longest_us)),
            tcp_retransmissions: tcp.as_ref().map_or(0, |t| t.retransmissions),
            udp_probes_sent: udp.as_ref().map_or(0, |u| u.probes_sent),
            udp_probes_lost: udp.as_ref().map_or(0, |u| u.lost),
            udp_longest_gap_ms: udp
                .as_ref()
                .and_then(|u| u.longest_gap.as_ref())
                .map(|g| ms(g.longest_us)),
            guest_stall_ms: guest_stall_us.map(ms),
            probe: report,
        };
        print_outcome(&outcome, json);
        let failure = judge(&outcome);
        if let Err(e) = self.topology.down() {
            eprintln!("ferry demo network: could not remove the topology: {e}");
        }
        (outcome, failure)
    }
}

fn print_outcome(o: &NetworkOutcome, json: bool) {
    let gap = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.1} ms"));
    say!(json, "");
    say!(json, "  the client's view of the migration");
    let rows = [
        (
            "TCP connection",
            if o.connection_kept {
                "kept"
            } else {
                "NOT kept"
            }
            .to_string(),
        ),
        (
            "TCP requests",
            format!(
                "{} sent, {} lost, {} resets, {} retransmissions",
                o.tcp_requests_sent, o.tcp_requests_lost, o.tcp_resets, o.tcp_retransmissions
            ),
        ),
        ("longest TCP reply gap", gap(o.tcp_longest_reply_gap_ms)),
        (
            "UDP probes",
            format!("{} sent, {} lost", o.udp_probes_sent, o.udp_probes_lost),
        ),
        ("longest UDP gap", gap(o.udp_longest_gap_ms)),
        ("guest-seen stall", gap(o.guest_stall_ms)),
    ];
    for (k, v) in rows {
        say!(json, "  {k:<26} {v}");
    }
}

/// Why the network part failed, if it did.
fn judge(o: &NetworkOutcome) -> Option<String> {
    let lost = o.probe.losses(0);
    (!lost.is_empty()).then(|| lost.join(", "))
}
