//! Starts a real `parallaxd` process on a temporary store for tests with real NBD clients.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockstore::{BlockStore, CreateOptions, OpenOptions};
use vdi::Registry;

pub const MIB: u64 = 1 << 20;

/// A client program must be installed; CI installs them all.
pub fn need(program: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false);
    if !found {
        panic!("{program} is not installed (apt-get install libnbd-bin nbdkit fio qemu-utils python3-libnbd)");
    }
}

/// Runs a command and returns its output; panics with everything it printed on failure.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with /usr/bin first on PATH (Debian's python has the nbd module).
pub fn run(program: &str, args: &[&str]) -> Output {
    let path = format!("/usr/bin:/usr/sbin:{}", std::env::var("PATH").unwrap_or_default());
    Command::new(program).args(args).env("PATH", path).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Opens the store directly (the daemon must not be running) to set it up or inspect it.
pub fn with_registry<T>(store: &Path, f: impl FnOnce(&Arc<Registry>) -> T) -> T {
    // Wait for the lock: a child process forked by a parallel test may hold a copy of our
    // previous descriptor for an instant (until its exec closes it).
    let opts = OpenOptions { wait_for_lock: true, ..OpenOptions::default() };
    let s = BlockStore::open_path(store, &opts, Some(&CreateOptions::default())).expect("open store");
    let reg = Registry::open(Arc::new(s)).expect("registry");
    f(&reg)
}

/// A running daemon.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub port: u16,
    pub socket: PathBuf,
    child: Option<Child>,
}

/// The port of the first `PREFIX127.0.0.1:PORT` in a daemon's log: where a socket bound to
/// port 0 ended up, as the daemon logs it once it listens.
pub fn logged_port(log: &str, prefix: &str) -> Option<u16> {
    let at = log.find(&format!("{prefix}127.0.0.1:"))? + prefix.len() + "127.0.0.1:".len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Daemon {
    /// A fresh store with one VDI "disk" of `size` bytes, not yet served.
    pub fn prepare(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("blockstore.dat");
        with_registry(&store, |r| r.create_vdi("disk", Some(size)).expect("create"));
        (dir, store)
    }

    /// Starts parallaxd on `store` with extra flags and waits until it says it is ready (the
    /// systemd readiness message on `NOTIFY_SOCKET`, sent once every socket listens). Its NBD
    /// port is one the kernel picked (`--nbd 127.0.0.1:0`), read from its log: no other
    /// process can hold it, as one could a port picked free beforehand (CI once saw a daemon
    /// whose port a parallel test took "start", because the port answered, for the other
    /// test's daemon). Its log (stderr) goes to `parallaxd.log` in its directory: read it with
    /// [`Daemon::log`].
    pub fn start(dir: tempfile::TempDir, store: PathBuf, extra: &[&str]) -> Daemon {
        let socket = dir.path().join("nbd.sock");
        let mut d = Daemon { dir, store, port: 0, socket, child: None };
        // The setup's own descriptor of the store may live on for an instant in a child that a
        // parallel test forked (until its exec closes it) and hold the store's lock: then the
        // daemon says the store is in use, and starting again shortly after succeeds.
        for attempt in 1.. {
            let notify = d.dir.path().join("notify.sock");
            let _ = std::fs::remove_file(&notify);
            let ready = UnixDatagram::bind(&notify).expect("readiness socket");
            let log = std::fs::File::create(d.dir.path().join("parallaxd.log")).expect("log file");
            let child = Command::new(env!("CARGO_BIN_EXE_parallaxd"))
                .arg("--store")
                .arg(&d.store)
                .args(["--nbd", "127.0.0.1:0", "--nbd-socket"])
                .arg(&d.socket)
                .args(extra)
                .env("PARALLAX_RUN_DIR", d.dir.path())
                // The port is read from an INFO line: a quieter level from the caller's
                // environment would hide it.
                .env("PARALLAX_LOG", "info")
                .env("NOTIFY_SOCKET", &notify)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start parallaxd");
            d.child = Some(child);
            match d.wait_ready(&ready) {
                Ok(()) => {
                    let log = d.log();
                    d.port =
                        logged_port(&log, "serving NBD on ").unwrap_or_else(|| panic!("no NBD port logged: {log}"));
                    return d;
                }
                Err(log) if attempt < 5 && log.contains("is in use by another process") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("parallaxd exited before it was ready: {log}"),
            }
        }
        unreachable!()
    }

    /// [`Daemon::start`]; kept for the tests that read the log, to say so.
    pub fn start_logged(dir: tempfile::TempDir, store: PathBuf, extra: &[&str]) -> Daemon {
        Self::start(dir, store, extra)
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("parallaxd.log")).unwrap_or_default()
    }

    /// Waits for the daemon's `READY=1` on `ready`; `Err` with its log if it exited first. The
    /// receive wakes at once on the message; its timeout only bounds how late an early exit is
    /// noticed.
    fn wait_ready(&mut self, ready: &UnixDatagram) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        ready.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        let mut msg = [0u8; 4096];
        loop {
            if let Ok(n) = ready.recv(&mut msg)
                && String::from_utf8_lossy(&msg[..n]).lines().any(|l| l == "READY=1")
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("({status}) {}", self.log()));
            }
            assert!(Instant::now() < deadline, "parallaxd was not ready after 20 s: {}", self.log());
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The daemon's resident memory now, in bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Runs the real `vdi` binary on this daemon's store (it finds the daemon's control socket
    /// from the store path); returns the exit code, stdout (trimmed) and stderr.
    pub fn vdi(&self, args: &[&str]) -> (i32, String, String) {
        let bin = Path::new(env!("CARGO_BIN_EXE_parallaxd")).with_file_name("vdi");
        assert!(bin.exists(), "build the vdi binary too (cargo test --workspace builds it)");
        let out = Command::new(bin)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("PARALLAX_RUN_DIR", self.dir.path())
            .output()
            .expect("run vdi");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    /// Sends SIGTERM and waits; returns the exit status code and the temp dir.
    pub fn stop(mut self) -> (i32, tempfile::TempDir, PathBuf) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "parallaxd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (code, dir, self.store.clone())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
