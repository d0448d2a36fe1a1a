//! The loopback TCP limit of this machine, measured in the same bench run
//! with Debian's iperf3 (1 and 4 streams): what every throughput row is set
//! against.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// How long each iperf3 client sends.
const SECONDS: u32 = 2;
/// The longest an iperf3 client may take, start-up included.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize)]
pub struct LoopbackLimit {
    /// Received bit rate with 1 stream and with 4, Gbit/s.
    pub one_stream_gbit: f64,
    pub four_streams_gbit: f64,
}

impl LoopbackLimit {
    /// The limit for a migration over `streams` connections.
    pub fn for_streams(&self, streams: u16) -> f64 {
        if streams >= 4 {
            self.four_streams_gbit
        } else {
            self.one_stream_gbit
        }
    }
}

/// Runs iperf3 on loopback, once with 1 stream and once with 4.
pub fn measure() -> anyhow::Result<LoopbackLimit> {
    Ok(LoopbackLimit {
        one_stream_gbit: run(1)?,
        four_streams_gbit: run(4)?,
    })
}

/// An iperf3 server that is killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn run(streams: u32) -> anyhow::Result<f64> {
    let port = free_port()?.to_string();
    let server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (scripts/setup.sh installs Debian's iperf3)")?;
    let _server = Server(server);
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let secs = SECONDS.to_string();
    let p = streams.to_string();
    loop {
        let mut client = Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port, "-t", &secs, "-P", &p, "-J"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 client")?;
        let out = wait_output(&mut client, deadline)?;
        let doc: serde_json::Value = match serde_json::from_slice(&out) {
            Ok(d) => d,
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => bail!("iperf3 printed no JSON: {e}"),
        };
        if doc["error"].is_string() && Instant::now() < deadline {
            // The server may not be listening yet.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let bps = doc["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3's report has no received rate: {}", doc["error"]))?;
        return Ok(bps / 1e9);
    }
}

fn wait_output(client: &mut Child, deadline: Instant) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    loop {
        if let Some(_status) = client.try_wait()? {
            let mut out = Vec::new();
            if let Some(mut s) = client.stdout.take() {
                s.read_to_end(&mut out)?;
            }
            return Ok(out);
        }
        if Instant::now() >= deadline {
            let _ = client.kill();
            let _ = client.wait();
            bail!("iperf3 did not finish within {CLIENT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
