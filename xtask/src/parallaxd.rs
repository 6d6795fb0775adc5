//! parallaxd on a task's store, on a free loopback port, stopped with SIGTERM (must exit 0).

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::servers::terminate;
use crate::sys;

/// A running parallaxd.
pub struct Daemon {
    child: Option<Child>,
    /// The NBD port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl Daemon {
    /// Starts parallaxd on `store` (control sockets in `run_dir`), logging to `log`, with
    /// `extra` flags; waits until it serves NBD.
    pub fn start(parallaxd: &Path, store: &Path, run_dir: &Path, log: &Path, extra: &[&OsStr]) -> Result<Daemon> {
        let port = sys::free_port()?;
        let logf = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let errf = logf.try_clone().context("cannot open the parallaxd log")?;
        let mut cmd = Command::new(parallaxd);
        cmd.arg("--store").arg(store).args(["--nbd", &format!("127.0.0.1:{port}")]).args(extra);
        cmd.env("PARALLAX_RUN_DIR", run_dir).env("PARALLAX_LOG", "warn");
        let what = sys::describe(&cmd);
        eprintln!("xtask: starting {what}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let mut d = Daemon { child: Some(child), port, log: log.to_path_buf() };
        d.wait_listening()?;
        Ok(d)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let port = self.port;
        let timeout = crate::servers::wait_listening(port, || self.check_alive());
        timeout.map_err(|e| anyhow::anyhow!("parallaxd: {e}; log:\n{}", self.log_tail()))
    }

    /// Fails if parallaxd has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(c) = self.child.as_mut() else { bail!("parallaxd was already stopped") };
        if let Some(st) = c.try_wait().context("cannot poll parallaxd")? {
            self.child = None;
            bail!("parallaxd exited unexpectedly ({st}); log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// SIGTERM; parallaxd must exit with status 0 within 30 s.
    pub fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { bail!("parallaxd was already stopped") };
        let st = terminate(&mut child)?;
        if !st.success() {
            bail!("parallaxd did not exit 0 on SIGTERM ({st}); log:\n{}", self.log_tail());
        }
        eprintln!("xtask: parallaxd stopped cleanly (exit 0)");
        Ok(())
    }

    /// SIGKILL: a crash, with no chance to commit or clean up.
    pub fn kill(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { bail!("parallaxd was already stopped") };
        child.kill().context("cannot SIGKILL parallaxd")?;
        child.wait().context("cannot reap parallaxd")?;
        eprintln!("xtask: parallaxd killed (SIGKILL)");
        Ok(())
    }

    /// The last lines of parallaxd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read the log: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c);
        }
    }
}
