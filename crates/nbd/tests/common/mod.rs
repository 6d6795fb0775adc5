//! Test harness: serves MemDisks over TCP or a Unix socket and runs real NBD clients.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::process::{Command, Output};
use std::sync::Arc;

use blockdev::{BlockDevice, MemDisk};
use nbd::{ExportInfo, ExportProvider, Limits, OpenError, Server};

/// A fixed set of named in-memory exports.
#[derive(Default)]
pub struct Exports {
    disks: HashMap<String, (Arc<MemDisk>, ExportInfo)>,
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a read-write disk of `size` bytes.
    pub fn disk(mut self, name: &str, size: u64) -> Self {
        let info = ExportInfo::new(name, format!("test disk {name}"));
        self.disks.insert(name.into(), (Arc::new(MemDisk::new(size)), info));
        self
    }

    /// Adds a read-only (all-zero) disk.
    pub fn read_only(mut self, name: &str, size: u64) -> Self {
        let info = ExportInfo::new(name, "read-only");
        self.disks.insert(name.into(), (Arc::new(MemDisk::new(size).into_read_only()), info));
        self
    }

    /// Adds a read-write disk advertised with `NBD_FLAG_CAN_MULTI_CONN`.
    pub fn multi_conn(mut self, name: &str, size: u64) -> Self {
        let info = ExportInfo { multi_conn: true, ..ExportInfo::new(name, "multi-conn") };
        self.disks.insert(name.into(), (Arc::new(MemDisk::new(size)), info));
        self
    }
}

impl ExportProvider for Exports {
    fn list(&self) -> Vec<ExportInfo> {
        let mut v: Vec<ExportInfo> = self.disks.values().map(|(_, i)| i.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        match self.disks.get(name) {
            Some((d, _)) => Ok(d.clone()),
            None => Err(OpenError::Unknown(format!("no export named {name:?}"))),
        }
    }
}

/// A running server plus handles to its disks.
pub struct TestServer {
    exports: Arc<Exports>,
    server: Option<Server>,
    endpoint: Endpoint,
    _dir: Option<tempfile::TempDir>,
}

enum Endpoint {
    Tcp(u16),
    Unix(String),
}

impl TestServer {
    /// Serves `exports` on 127.0.0.1 with an ephemeral port.
    pub fn tcp(exports: Exports) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let exports = Arc::new(exports);
        let server = Server::spawn_tcp(listener, exports.clone(), Limits::default()).expect("spawn server");
        TestServer { exports, server: Some(server), endpoint: Endpoint::Tcp(port), _dir: None }
    }

    /// Serves `exports` on a Unix socket in a fresh temporary directory.
    pub fn unix(exports: Exports) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let exports = Arc::new(exports);
        let server = Server::spawn_unix(listener, exports.clone(), Limits::default()).expect("spawn server");
        let path = path.to_str().expect("utf-8 path").to_owned();
        TestServer { exports, server: Some(server), endpoint: Endpoint::Unix(path), _dir: Some(dir) }
    }

    /// NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{name}"),
            Endpoint::Unix(path) => format!("nbd+unix:///{name}?socket={path}"),
        }
    }

    /// URI of the server without an export name.
    pub fn server_uri(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}"),
            Endpoint::Unix(path) => format!("nbd+unix:///?socket={path}"),
        }
    }

    /// The disk behind export `name`.
    pub fn disk(&self, name: &str) -> Arc<MemDisk> {
        self.exports.disks[name].0.clone()
    }

    /// Stops the server and waits for all its threads.
    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.wait();
        }
    }
}

/// The whole content of a disk.
pub fn contents(d: &MemDisk) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(0, &mut buf).expect("read disk");
    buf
}

/// True if `tool` is installed. A missing tool fails the test unless
/// `PARALLAX_SKIP_MISSING_CLIENTS=1`, in which case the caller skips.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("PARALLAX_SKIP_MISSING_CLIENTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {tool} is not installed (PARALLAX_SKIP_MISSING_CLIENTS=1)");
        return false;
    }
    panic!(
        "required NBD client `{tool}` is not installed (Debian: qemu-utils, libnbd-bin, python3-libnbd, fio); \
         set PARALLAX_SKIP_MISSING_CLIENTS=1 to skip"
    );
}

/// A command for `tool`, bounded by a timeout so a hung client cannot hang the test run.
///
/// `/usr/bin` comes first in `PATH` so tools implemented in Python (nbdsh) find the system
/// interpreter that has the distribution's bindings, not a user-installed one.
pub fn cmd(tool: &str) -> Command {
    let mut c = Command::new("timeout");
    c.arg("120").arg(tool);
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c
}

/// Runs `tool args...` and returns its output, whatever the exit status.
pub fn run(tool: &str, args: &[&str]) -> Output {
    cmd(tool).args(args).output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

/// Runs `tool args...`, panics (with its output) unless it succeeds, returns stdout.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
