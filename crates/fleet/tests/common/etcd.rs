//! A real etcd-server for one test: on loopback, on free ports, in a
//! fresh data directory; killed and its directory removed when the guard
//! drops, a failed test's unwinding included.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer /health after it starts.
const HEALTH_WAIT: Duration = Duration::from_secs(20);

pub struct EtcdServer {
    child: Child,
    dir: PathBuf,
    pub endpoint: String,
}

/// The `etcd` binary, or None (then a loud SKIPPED line names the test).
fn etcd_bin(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let line = format!(
            "SKIPPED {test}: etcd not installed (scripts/setup.sh installs Debian's etcd-server)"
        );
        eprintln!("{line}");
        println!("{line}");
    }
    found
}

fn free_port() -> u16 {
    // The port is free once the listener drops; etcd binds it right after.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdServer {
    /// Starts etcd for `test`, or says SKIPPED and gives None when etcd is
    /// not installed. Panics (with etcd's log) when it does not come up.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// As [`EtcdServer::start`], with more flags for etcd.
    pub fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        let bin = etcd_bin(test)?;
        let dir = std::env::temp_dir().join(format!(
            "ferry-etcd-{test}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd directory");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("create etcd.log");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .arg("--name=ferry-test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ferry-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            // Leases as short as the tests' (etcd's floor follows these).
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let server = Self {
            child,
            dir,
            endpoint: client_url,
        };
        let start = Instant::now();
        while !healthy(client) {
            assert!(
                start.elapsed() < HEALTH_WAIT,
                "etcd did not answer /health in {HEALTH_WAIT:?}; its log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
