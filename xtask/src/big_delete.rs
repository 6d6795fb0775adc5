//! `big-delete`: write a large VDI through parallaxd, delete it through the running daemon while
//! fio writes (with flushes) to another VDI, and report how long the delete took to return, how
//! long the space took to come back, and what the other VDI's I/O saw meanwhile.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::fio::{self, Span};
use crate::parallaxd::Daemon;
use crate::sys;

/// Flags of `big-delete`.
#[derive(Debug, Args)]
pub struct BigDeleteArgs {
    /// Bytes written to the VDI that is deleted (K/M/G binary).
    #[arg(long, default_value = "40G", value_parser = sys::parse_size)]
    pub size: u64,
    /// Seconds of fio on the other VDI before the delete (the undisturbed figure).
    #[arg(long, default_value_t = 10)]
    pub baseline_seconds: u64,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

fn vdi(bin: &Path, store: &Path, run_dir: &Path, args: &[&str]) -> Result<String> {
    let out = sys::run(Command::new(bin).arg("--store").arg(store).args(args).env("PARALLAX_RUN_DIR", run_dir))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn info(bin: &Path, store: &Path, run_dir: &Path) -> Result<Value> {
    let text = vdi(bin, store, run_dir, &["info", "--json"])?;
    serde_json::from_str(&text).context("vdi info --json is not JSON")
}

/// fio on the bystander VDI: 4 KiB random writes, QD16, a FLUSH every 32 writes.
fn bystander(uri: &str, seconds: u64, out: &Path) -> Result<Child> {
    Command::new("fio")
        .args([
            "--name=bystander",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--fsync=32",
            "--size=1G",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--output-format=json",
        ])
        .arg(format!("--output={}", out.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start fio")
}

/// (IOPS, max completion latency in ms, 99.9th percentile in ms) of a finished fio run.
fn fio_figures(path: &Path) -> Result<(f64, f64, f64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("fio wrote no {}", path.display()))?;
    let v: Value = serde_json::from_str(&text[text.find('{').context("no JSON from fio")?..])?;
    let w = &v["jobs"][0]["write"];
    let iops = w["iops"].as_f64().context("no write.iops")?;
    let max = w["clat_ns"]["max"].as_f64().context("no clat max")? / 1e6;
    let p999 = w["clat_ns"]["percentile"]["99.900000"].as_f64().unwrap_or(0.0) / 1e6;
    Ok((iops, max, p999))
}

/// Runs the scenario and prints its report.
pub fn run(a: &BigDeleteArgs) -> Result<()> {
    sys::require("fio", "fio", "big-delete")?;
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], a.no_build)?;
    let (parallaxd, vdi_bin) = (&bins[0], &bins[1]);
    let dir = tempfile::Builder::new().prefix("parallax-big-delete-").tempdir_in("/var/tmp")?;
    let store = dir.path().join("blockstore.dat");
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir)?;
    let vdi_size = (a.size + (a.size / 2)).max(1 << 30);
    vdi(vdi_bin, &store, &run_dir, &["create", "big", "--size", &sys::size_arg(vdi_size)])?;
    vdi(vdi_bin, &store, &run_dir, &["create", "vm", "--size", "1G"])?;
    let log = dir.path().join("parallaxd.log");
    let mut d = Daemon::start(parallaxd, &store, &run_dir, &log, &[] as &[&OsStr])?;
    let big = format!("nbd://127.0.0.1:{}/big", d.port);
    let vm = format!("nbd://127.0.0.1:{}/vm", d.port);
    eprintln!("xtask: writing {} to VDI big ...", sys::human(a.size));
    let (_, fill_time) = sys::timed(|| fio::run(&big, &fio::FILL, Span::Bytes(a.size)))?;
    fio::run(&vm, &fio::FILL, Span::Bytes(1 << 30))?;
    d.check_alive()?;
    let before = info(vdi_bin, &store, &run_dir)?;
    eprintln!("xtask: bystander fio alone for {} s ...", a.baseline_seconds);
    let alone_json = dir.path().join("alone.json");
    let status = bystander(&vm, a.baseline_seconds, &alone_json)?.wait()?;
    if !status.success() {
        bail!("fio on the bystander failed ({status})");
    }
    let alone = fio_figures(&alone_json)?;
    // The bystander runs through the delete and the whole reclaim.
    let during_json = dir.path().join("during.json");
    let budget = 600;
    let mut fio_child = bystander(&vm, budget, &during_json)?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let said = vdi(vdi_bin, &store, &run_dir, &["delete", "big", "--yes"])?;
    let delete_returned = t0.elapsed();
    eprintln!("xtask: {said} (returned in {delete_returned:?})");
    let mut snap_worst = Duration::ZERO;
    let mut snaps = 0;
    let reclaim_done = loop {
        let t = Instant::now();
        vdi(vdi_bin, &store, &run_dir, &["snap", "vm"])?;
        snap_worst = snap_worst.max(t.elapsed());
        snaps += 1;
        let i = info(vdi_bin, &store, &run_dir)?;
        if i["pending_reclaim"].as_u64() == Some(0) {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(budget - 10) {
            bail!("the reclaim did not finish within {} s", budget - 10);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // Stop the bystander now (SIGINT makes fio write its report).
    let pid = libc::pid_t::try_from(fio_child.id()).context("pid")?;
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    fio_child.wait()?;
    let during = fio_figures(&during_json)?;
    let after = info(vdi_bin, &store, &run_dir)?;
    let check = vdi(vdi_bin, &store, &run_dir, &["check"])?;
    if !check.contains("consistent") {
        bail!("vdi check after the delete: {check}");
    }
    d.stop()?;
    let gib = |v: &Value| v["allocated"].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    println!("## big-delete\n");
    println!("{}", crate::report::machine());
    println!(
        "- VDI `big`: {} written with fio (1 MiB, QD4) in {:.0} s; VDI `vm`: 1 GiB.",
        sys::human(a.size),
        fill_time.as_secs_f64()
    );
    println!(
        "- `vdi delete big` through the running parallaxd returned in {:.0} ms.",
        delete_returned.as_secs_f64() * 1e3
    );
    println!(
        "- Space: {:.2} GiB allocated before, {:.2} GiB after; all reclaimed {:.1} s after the delete.",
        gib(&before),
        gib(&after),
        reclaim_done.as_secs_f64()
    );
    println!(
        "- Meanwhile {snaps} `vdi snap vm` through the daemon all succeeded; slowest {:.0} ms.",
        snap_worst.as_secs_f64() * 1e3
    );
    println!(
        "- Bystander fio (4 KiB randwrite QD16, FLUSH every 32): alone {:.0} IOPS (max latency {:.1} ms, p99.9 {:.1} ms); \
         during delete + reclaim {:.0} IOPS (max {:.1} ms, p99.9 {:.1} ms).",
        alone.0, alone.1, alone.2, during.0, during.1, during.2
    );
    println!("- `vdi check` afterwards: consistent.");
    Ok(())
}
