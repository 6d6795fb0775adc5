//! `bench-snapshots`: what frequent snapshots cost, through a running parallaxd.
//!
//! Rows (each a ratio or a time measured in this run):
//! - `vdi snap` end to end through the daemon (the real binary, a fresh process each time):
//!   median and p99 over `--latency-count` snapshots.
//! - fio 4 KiB random writes, QD16, a FLUSH every 256 writes, on a pre-filled VDI, with the
//!   daemon taking a snapshot every 10 ms (retention keeping 100) against the same without:
//!   uniform random, and Zipf 1.2 (a VM's hot set).
//! - `vdi snap-list` and `vdi check` through the daemon at each `--stack` snapshot count,
//!   the snapshots taken every 10 ms while fio (Zipf) writes, so each differs from the last.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::fio::{self, Dir, Span, Workload};
use crate::parallaxd::Daemon;
use crate::report;
use crate::sys;

/// Flags of `bench-snapshots`.
#[derive(Debug, Args)]
pub struct BenchSnapshotsArgs {
    /// The CI form: a 1 GiB VDI, 5 s fio rows, 1,000 snapshots for the listing rows.
    #[arg(long)]
    pub short: bool,
    /// Size of the VDI fio writes (K/M/G binary). Default 10G, or 1G with --short.
    #[arg(long, value_parser = sys::parse_size)]
    pub size: Option<u64>,
    /// Seconds per fio row. Default 30, or 5 with --short.
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Snapshots timed for the latency row.
    #[arg(long, default_value_t = 200)]
    pub latency_count: usize,
    /// parallaxd's metadata cache, in 4 KiB blocks, for every daemon of the run (its own
    /// default if not given). A small one shows a host whose metadata outgrows its cache.
    #[arg(long)]
    pub cache_blocks: Option<usize>,
    /// Snapshot counts at which snap-list and check are timed. Default 1000,10000, or 1000
    /// with --short.
    #[arg(long, value_delimiter = ',')]
    pub stack: Vec<usize>,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

/// 4 KiB random writes, QD16, a FLUSH every 256 writes.
const RANDWRITE: Workload = Workload {
    title: "4 KiB random write, QD16, FLUSH every 256",
    rw: "randwrite",
    bs: 4096,
    iodepth: 16,
    dir: Dir::Write,
    fsync: 256,
};

/// The store, the binaries and the run directory of one benchmark.
struct Bench {
    parallaxd: PathBuf,
    vdi: PathBuf,
    dir: tempfile::TempDir,
    store: PathBuf,
    run_dir: PathBuf,
    logs: usize,
    /// `--cache-blocks` for every daemon, if given.
    cache_blocks: Option<usize>,
}

impl Bench {
    fn vdi(&self, args: &[&str]) -> Result<String> {
        let out = sys::run(
            Command::new(&self.vdi).arg("--store").arg(&self.store).args(args).env("PARALLAX_RUN_DIR", &self.run_dir),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Starts parallaxd with `extra` flags (its log in the bench directory).
    fn daemon(&mut self, extra: &[&str]) -> Result<Daemon> {
        self.logs += 1;
        let log = self.dir.path().join(format!("parallaxd-{}.log", self.logs));
        let cache = self.cache_blocks.map(|c| c.to_string());
        let cache_flags = cache.as_deref().map(|c| ["--cache-blocks", c]);
        let extra: Vec<&OsStr> = extra.iter().chain(cache_flags.iter().flatten()).map(OsStr::new).collect();
        Daemon::start(&self.parallaxd, &self.store, &self.run_dir, &log, &extra)
    }

    /// Live snapshots of VDI `vm`.
    fn snapshots(&self) -> Result<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&self.vdi(&["info", "vm", "--json"])?).context("vdi info --json is not JSON")?;
        v["snapshots"].as_u64().context("no snapshots in vdi info --json")
    }

    /// Wall time of `vdi ARGS` through the daemon (the command must succeed).
    fn time(&self, args: &[&str]) -> Result<Duration> {
        let t = Instant::now();
        self.vdi(args)?;
        Ok(t.elapsed())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Runs the benchmark and prints its report on stdout (progress goes to stderr).
pub fn run(a: &BenchSnapshotsArgs) -> Result<()> {
    let size = a.size.unwrap_or(if a.short { 1 << 30 } else { 10 << 30 });
    let runtime = a.runtime.unwrap_or(if a.short { 5 } else { 30 });
    let stack = if !a.stack.is_empty() {
        a.stack.clone()
    } else if a.short {
        vec![1000]
    } else {
        vec![1000, 10_000]
    };
    if runtime == 0 || a.latency_count == 0 {
        bail!("--runtime and --latency-count must be at least 1");
    }
    let ramp = if runtime >= 10 { 2 } else { 1 };
    let machine = report::machine();
    sys::require("fio", "fio", "bench-snapshots")?;
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], a.no_build)?;
    let dir = tempfile::Builder::new().prefix("parallax-bench-snapshots-").tempdir_in("/var/tmp")?;
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir)?;
    let mut b = Bench {
        parallaxd: bins[0].clone(),
        vdi: bins[1].clone(),
        store: dir.path().join("blockstore.dat"),
        dir,
        run_dir,
        logs: 0,
        cache_blocks: a.cache_blocks,
    };
    b.vdi(&["create", "vm", "--size", &sys::size_arg(size)])?;

    // Fill the VDI once, then the rows without snapshots: every block is the VDI's own.
    let mut d = b.daemon(&[])?;
    let uri = format!("nbd://127.0.0.1:{}/vm", d.port);
    eprintln!("xtask: filling {} ...", sys::human(size));
    fio::run(&uri, &fio::FILL, Span::Bytes(size))?;
    let zipf = vec!["--random_distribution=zipf:1.2".to_string()];
    let span = Span::Time { size, runtime, ramp };
    eprintln!("xtask: fio without snapshots, uniform then Zipf 1.2 ({runtime} s each) ...");
    let plain_uniform = fio::run(&uri, &RANDWRITE, span)?;
    let plain_zipf = fio::run_with(&uri, &RANDWRITE, span, &zipf)?;
    d.check_alive()?;

    // Snapshot latency through the idle daemon.
    eprintln!("xtask: {} snapshots through the daemon ...", a.latency_count);
    let mut lat = Vec::with_capacity(a.latency_count);
    for _ in 0..a.latency_count {
        lat.push(b.time(&["snap", "vm"])?);
    }
    lat.sort();
    let baseline = b.time(&["--version"])?;
    d.stop()?;

    // The same fio rows with a snapshot every 10 ms (retention keeping 100).
    let mut d = b.daemon(&["--snapshot-every", "10ms", "--keep", "100"])?;
    let uri = format!("nbd://127.0.0.1:{}/vm", d.port);
    eprintln!("xtask: fio with a snapshot every 10 ms, uniform then Zipf 1.2 ...");
    let before = last_snapshot_id(&b)?;
    let t0 = Instant::now();
    let snap_uniform = fio::run(&uri, &RANDWRITE, span)?;
    let snap_zipf = fio::run_with(&uri, &RANDWRITE, span, &zipf)?;
    let fio_time = t0.elapsed();
    d.check_alive()?;
    d.stop()?;
    // Retention keeps the count at 100: count the snapshots taken from the ids instead.
    let taken = last_snapshot_id(&b)?.saturating_sub(before);
    let per_s = taken as f64 / fio_time.as_secs_f64();

    // Stacks of snapshots taken every 10 ms while fio writes a hot set, then listed and checked.
    let mut stack_rows = Vec::new();
    for &target in &stack {
        let have = b.snapshots()?;
        if have < target as u64 {
            let mut d = b.daemon(&["--snapshot-every", "10ms"])?;
            let uri = format!("nbd://127.0.0.1:{}/vm", d.port);
            eprintln!("xtask: taking snapshots every 10 ms while fio writes, up to {target} ...");
            let mut fio_child = Command::new("fio")
                .args([
                    "--name=stack",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--fsync=256",
                    "--random_distribution=zipf:1.2",
                    &format!("--size={size}"),
                    "--time_based",
                    "--runtime=100000",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("cannot start fio")?;
            let deadline = Instant::now() + Duration::from_secs(60 + target as u64 / 20);
            // A driver waiting for a count it can only read: it looks once a second.
            let reached = loop {
                std::thread::sleep(Duration::from_secs(1));
                let n = b.snapshots()?;
                if n >= target as u64 || Instant::now() > deadline {
                    break n;
                }
                d.check_alive()?;
            };
            let _ = fio_child.kill();
            let _ = fio_child.wait();
            d.stop()?;
            if reached < target as u64 {
                bail!("only {reached} snapshots after the time allowed for {target}");
            }
        }
        let d = b.daemon(&[])?;
        let n = b.snapshots()?;
        let list = b.time(&["snap-list", "vm"])?;
        let t = Instant::now();
        let check_out = b.vdi(&["check", "--json"]).with_context(|| format!("vdi check at {n} snapshots"))?;
        let check = t.elapsed();
        let nodes =
            serde_json::from_str::<serde_json::Value>(&check_out).ok().and_then(|v| v["nodes"].as_u64()).unwrap_or(0);
        d.stop()?;
        stack_rows.push((n, list, check, nodes));
    }

    println!("## bench-snapshots{}\n", if a.short { " (--short)" } else { "" });
    println!("{machine}");
    println!("{}", report::versions(&[("fio", &["--version"])]));
    println!(
        "- Setup: parallaxd on a store in /var/tmp, NBD over TCP on 127.0.0.1; one VDI of {} pre-filled \
         by a 1 MiB sequential write; fio --ioengine=nbd, 1 job, {runtime} s per fio row after {ramp} s of \
         warm-up; `vdi` is the release binary, a new process per command; metadata cache {}.\n",
        sys::human(size),
        match a.cache_blocks {
            Some(c) => format!("{c} blocks (`--cache-blocks`)"),
            None => "parallaxd's default".to_string(),
        }
    );
    let header: Vec<String> = ["what", "measured", "goal"].iter().map(|s| s.to_string()).collect();
    let mut rows = vec![
        vec![
            format!("`vdi snap` through parallaxd, end to end (n = {})", a.latency_count),
            format!(
                "median {}, p99 {} (`vdi --version` alone: {})",
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(baseline)
            ),
            "< 5 ms".into(),
        ],
        vec![
            "fio 4 KiB randwrite QD16, FLUSH/256, uniform: with 10 ms snapshots / without".into(),
            with_without(snap_uniform.iops, plain_uniform.iops),
            "≥ 0.65×".into(),
        ],
        vec!["same, Zipf 1.2".into(), with_without(snap_zipf.iops, plain_zipf.iops), "≥ 0.90×".into()],
        vec![
            "write latency p50 / p99 / p99.9 / max, uniform: without snapshots → with".into(),
            latency_pair(&plain_uniform, &snap_uniform),
            "no stalls".into(),
        ],
        vec!["same, Zipf 1.2".into(), latency_pair(&plain_zipf, &snap_zipf), "no stalls".into()],
        vec![
            "snapshots taken during the two fio rows".into(),
            format!("{taken} ({per_s:.0}/s; 100/s scheduled)"),
            String::new(),
        ],
    ];
    for (n, list, check, nodes) in stack_rows {
        rows.push(vec![format!("`vdi snap-list` at {n} snapshots"), ms(list), "< 200 ms at 10,000".into()]);
        rows.push(vec![format!("`vdi check` at {n} snapshots ({nodes} nodes)"), ms(check), "< 5 s at 10,000".into()]);
    }
    println!("{}", report::table(&header, &rows));
    Ok(())
}

/// "0.1 / 0.9 / 2.0 / 9.1 ms → …": fio's write completion latency without and with snapshots —
/// where a snapshot or retention holding writes up would show, which IOPS averages away.
fn latency_pair(without: &fio::Result1, with: &fio::Result1) -> String {
    let one = |r: &fio::Result1| match r.latency {
        Some(l) => format!("{:.2} / {:.2} / {:.1} / {:.1} ms", l.p50 / 1e3, l.p99 / 1e3, l.p999 / 1e3, l.max / 1e3),
        None => "(fio reported no latency)".to_string(),
    };
    format!("{} → {}", one(without), one(with))
}

/// "0.42× (4,200 / 10,000 IOPS)": IOPS with snapshots against without.
fn with_without(with: f64, without: f64) -> String {
    format!("{} ({} / {} IOPS)", report::ratio(with, without), report::thousands(with), report::thousands(without))
}

/// The highest snapshot id of VDI `vm` (deleted ones included).
fn last_snapshot_id(b: &Bench) -> Result<u64> {
    let text = b.vdi(&["snap-list", "vm", "--all", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&text).context("vdi snap-list --json is not JSON")?;
    Ok(v.as_array().map(|a| a.iter().filter_map(|s| s["id"].as_u64()).max().unwrap_or(0)).unwrap_or(0))
}
