//! Starting and stopping each NBD server under test, each on a free loopback port.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys;

/// The export name every server is asked to serve.
pub const EXPORT: &str = "bench";

/// qemu-nbd's cache and AIO modes, stated in the report: qemu's defaults (host page cache,
/// flushed on NBD FLUSH), the same buffered-with-fsync-on-flush behaviour as parallaxd's file backend.
pub const QEMU_CACHE: &[&str] = &["--cache=writeback", "--aio=threads"];

/// The servers compared, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// parallaxd serving a VDI of a fresh store.
    Parallaxd,
    /// parallaxd as built from an earlier revision (`bench-nbd --baseline REV`).
    ParallaxdBaseline,
    /// `qemu-nbd -f qcow2` on a fresh qcow2 image.
    QemuQcow2,
    /// `qemu-nbd -f raw` on a sparse raw file.
    QemuRaw,
    /// `nbdkit memory`: no storage at all, the transport's ceiling.
    NbdkitMemory,
}

impl Kind {
    /// All servers, in table order.
    pub const ALL: [Kind; 4] = [Kind::Parallaxd, Kind::QemuQcow2, Kind::QemuRaw, Kind::NbdkitMemory];

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Parallaxd => "parallaxd",
            Kind::ParallaxdBaseline => "parallaxd (baseline)",
            Kind::QemuQcow2 => "qemu-nbd+qcow2",
            Kind::QemuRaw => "qemu-nbd+raw",
            Kind::NbdkitMemory => "nbdkit memory",
        }
    }
}

/// Paths of the workspace binaries parallaxd needs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `target/release/parallaxd`.
    pub parallaxd: PathBuf,
    /// `target/release/vdi`.
    pub vdi: PathBuf,
}

/// A running NBD server with its scratch directory (removed on drop).
pub struct Server {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Creates the backing disk of `size` bytes for `kind` in a fresh temp dir and starts serving it.
    pub fn start(kind: Kind, size: u64, bins: &Binaries) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("parallax-bench-")
            .tempdir()
            .context("cannot create a temp dir for the server")?;
        let port = sys::free_port()?;
        let log = dir.path().join("server.log");
        let addr = format!("127.0.0.1:{port}");
        let port_s = port.to_string();
        let mut cmd = match kind {
            Kind::Parallaxd | Kind::ParallaxdBaseline => {
                let store = dir.path().join("blockstore.dat");
                let run_dir = dir.path().join("run");
                std::fs::create_dir(&run_dir).context("cannot create the run dir")?;
                sys::run(
                    Command::new(&bins.vdi)
                        .arg("--store")
                        .arg(&store)
                        .args(["create", EXPORT, "--size", &sys::size_arg(size)])
                        .env("PARALLAX_RUN_DIR", &run_dir),
                )?;
                let mut c = Command::new(&bins.parallaxd);
                c.arg("--store").arg(&store).args(["--nbd", &addr]).env("PARALLAX_RUN_DIR", &run_dir);
                c.env("PARALLAX_LOG", "warn");
                c
            }
            Kind::QemuQcow2 | Kind::QemuRaw => {
                let (fmt, image) = if kind == Kind::QemuQcow2 {
                    let p = dir.path().join("disk.qcow2");
                    sys::run(
                        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&p).arg(size.to_string()),
                    )?;
                    ("qcow2", p)
                } else {
                    let p = dir.path().join("disk.raw");
                    File::create(&p)
                        .and_then(|f| f.set_len(size))
                        .with_context(|| format!("cannot create the raw image {}", p.display()))?;
                    ("raw", p)
                };
                let mut c = Command::new("qemu-nbd");
                c.args(["-f", fmt, "-t", "-x", EXPORT, "-b", "127.0.0.1", "-p", &port_s]).args(QEMU_CACHE).arg(&image);
                c
            }
            Kind::NbdkitMemory => {
                let mut c = Command::new("nbdkit");
                c.args(["--foreground", "--ipaddr", "127.0.0.1", "--port", &port_s]);
                c.args(["memory", &format!("size={size}")]);
                c
            }
        };
        let logf = File::create(&log).context("cannot create the server log")?;
        let errf = logf.try_clone().context("cannot open the server log")?;
        let what = sys::describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let mut s = Server { kind, child: Some(child), port, log, _dir: dir };
        s.wait_listening().with_context(|| format!("{} did not start: `{what}`", kind.title()))?;
        Ok(s)
    }

    /// The NBD URI of the export, for fio's nbd engine.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{EXPORT}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Fails if the server has exited (crashed) since it started.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(c) = self.child.as_mut() else { bail!("{} was already stopped", self.kind.title()) };
        if let Some(st) = c.try_wait().context("cannot poll the server")? {
            self.child = None;
            bail!("{} exited unexpectedly ({st}); its log:\n{}", self.kind.title(), self.log_tail());
        }
        Ok(())
    }

    fn wait_listening(&mut self) -> Result<()> {
        let port = self.port;
        let timeout = wait_listening(port, || self.check_alive());
        timeout.map_err(|e| anyhow::anyhow!("{e}; its log:\n{}", self.log_tail()))
    }

    /// Sends SIGTERM and waits up to 30 s. parallaxd must exit with status 0; the peers may also
    /// die of the SIGTERM itself (qemu-nbd and nbdkit do not all trap it).
    pub fn stop(mut self) -> Result<()> {
        let kind = self.kind;
        let Some(mut child) = self.child.take() else { bail!("{} was already stopped", kind.title()) };
        let status = terminate(&mut child).with_context(|| format!("stopping {}", kind.title()))?;
        use std::os::unix::process::ExitStatusExt;
        let clean = status.success()
            || (!matches!(kind, Kind::Parallaxd | Kind::ParallaxdBaseline) && status.signal() == Some(libc::SIGTERM));
        if !clean {
            bail!("{} did not stop cleanly on SIGTERM ({status}); its log:\n{}", kind.title(), self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c);
        }
    }
}

/// Waits up to 30 s until something accepts connections on 127.0.0.1:`port`, failing early
/// if `alive` says the process died.
pub(crate) fn wait_listening(port: u16, mut alive: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alive()?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not listening on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then wait up to 30 s; SIGKILL and fail if it is still running.
pub(crate) fn terminate(child: &mut Child) -> Result<ExitStatus> {
    if let Some(st) = child.try_wait()? {
        return Ok(st);
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (try_wait returned None).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running 30 s after SIGTERM (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => "(empty)".to_string(),
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Peak resident set size of a process in bytes (`VmHWM` of /proc/PID/status).
pub fn peak_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:")).with_context(|| format!("no VmHWM line in {path}"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("cannot parse '{line}' in {path}"))?;
    Ok(kib * 1024)
}
