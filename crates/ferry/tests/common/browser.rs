//! Headless chromium for the tests of the fleet's web page: its DOM and
//! a screenshot of a URL, each run bounded and killed with every helper
//! process it started. Included by path in crates/ferry's `fleet_web`
//! (a store filled by the test) and crates/agent's `fleet_web` (real
//! agents); not a module of `common`, which these tests do not need.

// Each test file uses some of it.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a chromium run may take.
pub const BROWSER_LIMIT: Duration = Duration::from_secs(90);

/// A child in a process group of its own, the whole group killed on drop
/// (chromium starts helpers of its own), a failing test's included.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(c: &mut Command) -> Self {
        Self(c.process_group(0).spawn().expect("start a process"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test made; no memory
        // is involved.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `c` to its end, at most `limit`; its status and stdout.
pub fn run_bounded(c: &mut Command, limit: Duration) -> (std::process::ExitStatus, Vec<u8>) {
    let mut p = Proc::spawn(c.stdin(Stdio::null()).stdout(Stdio::piped()));
    let mut out = p.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < limit,
            "{c:?} did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The group's helpers may hold the pipe open: kill them before reading.
    drop(p);
    (status, reader.join().unwrap())
}

/// The chromium binary, or None after a loud SKIPPED line naming `test`.
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        ["chromium", "chromium-browser"].iter().find_map(|name| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        let why = "chromium is not installed (scripts/setup.sh installs Debian's chromium)";
        eprintln!("SKIPPED {test}: {why}");
        println!("SKIPPED {test}: {why}");
    }
    found
}

/// Headless chromium on `url` with `extra` flags, its profile in `profile`.
fn browse(
    chromium: &Path,
    profile: &Path,
    extra: &[String],
    url: &str,
) -> (std::process::ExitStatus, Vec<u8>) {
    let mut c = Command::new(chromium);
    c.args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stderr(Stdio::null());
    run_bounded(&mut c, BROWSER_LIMIT)
}

/// The DOM chromium built from `url`.
pub fn dump_dom(chromium: &Path, profile: &Path, url: &str) -> String {
    let (status, dom) = browse(chromium, profile, &["--dump-dom".into()], url);
    assert!(status.success(), "chromium --dump-dom: {status}");
    String::from_utf8(dom).expect("the DOM is UTF-8")
}

/// A 1280x1600 screenshot of `url` at `png`, checked to be a PNG of that
/// size with something drawn in it (copied to $FERRY_FLEET_WEB_SCREENSHOT
/// when set, to look at).
pub fn screenshot(chromium: &Path, profile: &Path, url: &str, png: &Path) {
    let (status, _) = browse(
        chromium,
        profile,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1600".into(),
        ],
        url,
    );
    assert!(status.success(), "chromium --screenshot: {status}");
    let bytes = std::fs::read(png).expect("the screenshot");
    // A blank page of this size compresses to a few kB.
    assert!(bytes.len() > 10_000, "a {} byte screenshot", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (1280, 1600), "the window's size");
    if let Some(keep) = std::env::var_os("FERRY_FLEET_WEB_SCREENSHOT") {
        std::fs::copy(png, &keep).unwrap();
        println!("screenshot kept at {}", Path::new(&keep).display());
    }
}

/// Waits (at most `limit`) for `file` to hold the web page's address.
pub fn wait_addr_file(file: &Path, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(file) {
            return a;
        }
        assert!(
            start.elapsed() < limit,
            "serve never wrote its web address to {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.0 request: status and body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nhost: {addr}\r\ncontent-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let status = r
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}
