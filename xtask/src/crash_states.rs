//! `crash-states`: the crash-state suite (crates/crashtest) with as many states as asked, built
//! in release mode. CI runs the suite's default size through `cargo test`; this is for long runs.

use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::sys;

/// Flags of `crash-states`.
#[derive(Debug, Args)]
pub struct CrashStatesArgs {
    /// Crash states to build and check, spread over the workloads' sync windows.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub states: u64,
}

/// Runs the suite and fails if any state fails.
pub fn run(a: &CrashStatesArgs) -> Result<()> {
    // One workload of the suite runs through a store in RADOS.
    let ceph = crate::ceph::Ceph::for_tests()?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(sys::workspace_root())
        .args([
            "test",
            "--release",
            "-p",
            "crashtest",
            "--test",
            "crash_states",
            "--",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CRASH_STATES", a.states.to_string())
        .env("PARALLAX_TEST_CEPH_CONF", &ceph.conf);
    eprintln!("xtask: {}", sys::describe(&cmd));
    let status = cmd.status()?;
    drop(ceph);
    if !status.success() {
        bail!("the crash-state suite failed ({status})");
    }
    Ok(())
}
