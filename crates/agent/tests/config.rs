//! Starting ferryd: clear errors for a bad config, a stale socket replaced
//! only when nothing listens on it, one agent per socket and per state
//! directory, the socket's mode.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{ferryd_bin, Agent, TempDir};

/// A process killed and reaped when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferryd_fails(config: &std::path::Path) -> String {
    let out = Command::new(ferryd_bin())
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "ferryd should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configs_are_refused_clearly() {
    let dir = TempDir::new("badconfig");
    let err = ferryd_fails(&dir.path("missing.toml"));
    assert!(err.contains("cannot read the config"), "{err}");

    let write = |name: &str, text: &str| {
        let p = dir.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let base = format!(
        "host_name = \"h\"\nsocket = \"{}\"\nstate_dir = \"{}\"\nferry_bin = \"/bin/false\"\n[capacity]\nmemory = \"1G\"\nvcpus = 2\n",
        dir.path("s.sock").display(),
        dir.path("state").display()
    );
    let err = ferryd_fails(&write(
        "typo.toml",
        &base.replace("vcpus = 2", "vcpus = 2\nvcpu = 1"),
    ));
    assert!(err.contains("unknown field `vcpu`"), "{err}");
    let err = ferryd_fails(&write("unit.toml", &base.replace("\"1G\"", "\"1024\"")));
    assert!(
        err.contains("capacity.memory") && err.contains("no unit"),
        "{err}"
    );
    let err = ferryd_fails(&write(
        "addr.toml",
        &format!("peer_listen = \"nowhere\"\n{base}"),
    ));
    assert!(
        err.contains("peer_listen") || err.contains("invalid socket address"),
        "{err}"
    );
    let err = ferryd_fails(&write(
        "retention.toml",
        &format!("{base}[retention]\nkeep = 10\nmax_age_hours = 0\n"),
    ));
    assert!(
        err.contains("retention") && err.contains("max_age_hours"),
        "{err}"
    );
    let err = ferryd_fails(&write(
        "retention-typo.toml",
        &format!("{base}[retention]\nkeep_last = 10\n"),
    ));
    assert!(err.contains("unknown field `keep_last`"), "{err}");
    let err = ferryd_fails(&write("notoml.toml", "this is not toml"));
    assert!(err.contains("is not valid"), "{err}");
    assert!(
        !dir.path("state").exists(),
        "a refused config creates nothing"
    );
}

#[test]
fn one_agent_per_socket_and_state_dir_and_stale_sockets_are_replaced() {
    // A stale socket: bound once, nothing listens any more.
    let dir = TempDir::new("stale");
    let socket = dir.path("ferryd.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let config = dir.path("host.toml");
    std::fs::write(
        &config,
        format!(
            "host_name = \"h\"\nsocket = \"{}\"\nstate_dir = \"{}\"\nferry_bin = \"/bin/false\"\n[capacity]\nmemory = \"1G\"\nvcpus = 2\n",
            socket.display(),
            dir.path("state").display()
        ),
    )
    .unwrap();
    let first = KillOnDrop(
        Command::new(ferryd_bin())
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap(),
    );
    let client = ferry_agent::client::AgentClient::new(&socket);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while client.get("/v1/vms").map(|r| r.status).ok() != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "ferryd did not replace the stale socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(first);

    // A live agent: a second on its socket is refused, and so is one on
    // its state directory; the first serves on.
    let agent = Agent::with_ferry_bin("live", "1G", 2, Some("/bin/false".as_ref()));
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "the socket's mode");
    let other = TempDir::new("live-other");
    let same_socket = other.path("a.toml");
    std::fs::write(
        &same_socket,
        format!(
            "host_name = \"h2\"\nsocket = \"{}\"\nstate_dir = \"{}\"\nferry_bin = \"/bin/false\"\n[capacity]\nmemory = \"1G\"\nvcpus = 2\n",
            agent.socket.display(),
            other.path("state").display()
        ),
    )
    .unwrap();
    let err = ferryd_fails(&same_socket);
    assert!(err.contains("another ferryd already listens"), "{err}");
    let same_state = other.path("b.toml");
    std::fs::write(
        &same_state,
        format!(
            "host_name = \"h2\"\nsocket = \"{}\"\nstate_dir = \"{}\"\nferry_bin = \"/bin/false\"\n[capacity]\nmemory = \"1G\"\nvcpus = 2\n",
            other.path("b.sock").display(),
            agent.dir.path("state").display()
        ),
    )
    .unwrap();
    let err = ferryd_fails(&same_state);
    assert!(
        err.contains("another ferryd using this state directory"),
        "{err}"
    );
    assert_eq!(
        agent.get("/v1/vms").status,
        200,
        "the first agent serves on"
    );
}
