//! `cargo xtask ring-test` and `cargo xtask bench-ring`: parallaxd serving simulated Xen guests
//! (blktap-sim-frontend processes) over the blkif shared ring.
//!
//! ring-test: one golden VDI is filled with a known pattern, snapshotted and cloned N times; N
//! guests attach to their clones at once and run a verified random mix of reads, writes,
//! barrier writes, flushes and discards with many requests in flight. Each checks every read
//! against its own model (a read showing another guest's data names that guest). Afterwards,
//! with parallaxd stopped (cleanly, or with SIGKILL after the guests' final flushes: `--kill`),
//! every clone is exported and compared with its guest's model, the golden snapshot and VDI are
//! compared with the pattern, and `vdi check` must pass.
//!
//! bench-ring: IOPS and bandwidth of 4 KiB random and 64 KiB sequential I/O through the
//! simulated ring, beside the same workloads through NBD (fio's nbd engine) on the same
//! daemon, in one run.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blkfront_sim::workload::{Digest, golden_image};
use clap::Args;

use crate::fio::{self, Dir, Span, Workload};
use crate::parallaxd::Daemon;
use crate::report;
use crate::sys;

/// Flags of `ring-test`.
#[derive(Debug, Args)]
pub struct RingTestArgs {
    /// Simulated guests, each on its own clone of the golden VDI.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub guests: u32,
    /// Requests each guest issues (plus a full read-back at the end).
    #[arg(long, default_value_t = 3000)]
    pub ops: u64,
    /// Requests each guest keeps in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub depth: u32,
    /// Size of the golden VDI (K/M/G binary).
    #[arg(long, default_value = "32M", value_parser = sys::parse_size)]
    pub size: u64,
    /// Worker threads per ring in parallaxd.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// Seed of the guests' random mixes (guest k uses seed ^ k).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// SIGKILL parallaxd once every guest has finished (its last request was a flush that
    /// completed) instead of stopping it cleanly: everything must be there after the crash.
    #[arg(long)]
    pub kill: bool,
    /// Keep the scratch directory and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

/// Flags of `bench-ring`.
#[derive(Debug, Args)]
pub struct BenchRingArgs {
    /// A 128M disk and 2 s runs (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Size of the benchmarked VDI. Default 1G, or 128M with --quick.
    #[arg(long, value_parser = sys::parse_size)]
    pub size: Option<u64>,
    /// Seconds per workload and transport. Default 10, or 2 with --quick.
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Requests in flight (ring and NBD alike).
    #[arg(long, default_value_t = 16)]
    pub depth: u32,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

struct Bins {
    parallaxd: PathBuf,
    vdi: PathBuf,
    frontend: PathBuf,
}

fn binaries(no_build: bool) -> Result<Bins> {
    let b = sys::release_binaries(
        &["daemon", "cli", "blkfront-sim"],
        &["parallaxd", "vdi", "blktap-sim-frontend"],
        no_build,
    )?;
    Ok(Bins { parallaxd: b[0].clone(), vdi: b[1].clone(), frontend: b[2].clone() })
}

/// A scratch store and the `vdi` command on it.
struct Store {
    vdi: PathBuf,
    path: PathBuf,
    run_dir: PathBuf,
}

impl Store {
    fn new(vdi: &Path, work: &Path) -> Result<Store> {
        let run_dir = work.join("run");
        std::fs::create_dir_all(&run_dir).context("cannot create the run dir")?;
        Ok(Store { vdi: vdi.to_path_buf(), path: work.join("blockstore.dat"), run_dir })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.vdi);
        c.arg("--store").arg(&self.path).args(args).env("PARALLAX_RUN_DIR", &self.run_dir);
        c
    }

    fn text(&self, args: &[&str]) -> Result<String> {
        Ok(sys::run_text(&mut self.cmd(args))?.trim().to_string())
    }

    /// Streams `vdi export SOURCE -` and returns the digest and length of the image.
    fn export_digest(&self, source: &str) -> Result<(u64, u64)> {
        let mut cmd = self.cmd(&["export", source, "-"]);
        let what = sys::describe(&cmd);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("cannot run vdi export")?;
        let mut out = child.stdout.take().context("no stdout")?;
        let (mut d, mut len, mut buf) = (Digest::new(), 0u64, vec![0u8; 1 << 20]);
        loop {
            let n = out.read(&mut buf).with_context(|| format!("reading `{what}`"))?;
            if n == 0 {
                break;
            }
            d.update(&buf[..n]);
            len += n as u64;
        }
        let done = child.wait_with_output()?;
        if !done.status.success() {
            bail!("`{what}` failed: {}", String::from_utf8_lossy(&done.stderr).trim());
        }
        Ok((d.value(), len))
    }

    fn allocated(&self) -> Result<u64> {
        let text = self.text(&["info", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("`vdi info --json` is not JSON")?;
        v.get("allocated").and_then(serde_json::Value::as_u64).context("`vdi info --json` has no `allocated`")
    }
}

fn start_daemon(bins: &Bins, store: &Store, work: &Path, workers: u32) -> Result<(Daemon, PathBuf)> {
    let sock = work.join("ring.sock");
    let workers = workers.to_string();
    let extra: [&OsStr; 4] =
        [OsStr::new("--ring-socket"), sock.as_os_str(), OsStr::new("--ring-workers"), OsStr::new(&workers)];
    let d = Daemon::start(&bins.parallaxd, &store.path, &store.run_dir, &work.join("parallaxd.log"), &extra)?;
    // parallaxd binds the ring socket before it serves NBD, so it exists now.
    if !sock.exists() {
        bail!("parallaxd serves NBD but no ring socket at {}", sock.display());
    }
    Ok((d, sock))
}

fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir().context("cannot create a temp dir")
}

/// Runs ring-test.
pub fn run_test(args: &RingTestArgs) -> Result<()> {
    if args.size < 1 << 20 || !args.size.is_multiple_of(4096) {
        bail!("--size must be at least 1M and a multiple of 4K");
    }
    let bins = binaries(args.no_build)?;
    let dir = scratch("parallax-ring-test-")?;
    let result = test_in(args, &bins, dir.path());
    if args.keep {
        eprintln!("ring-test: kept {}", dir.keep().display());
    }
    result
}

/// A golden VDI filled with the pattern, its snapshot and N clones of it.
struct Golden {
    id: String,
    snap: String,
    digest: u64,
    size: u64,
    names: Vec<String>,
}

fn prepare_golden(store: &Store, work: &Path, size: u64, n: usize) -> Result<Golden> {
    let golden_file = work.join("golden.img");
    let golden = golden_image(size / 512);
    let mut d = Digest::new();
    d.update(&golden);
    std::fs::write(&golden_file, &golden).context("cannot write the golden image")?;
    drop(golden);
    let id = store.text(&["create", "golden"])?;
    store.text(&["fill", &id, &golden_file.to_string_lossy()])?;
    let snap = store.text(&["snap", &id])?;
    let names: Vec<String> = (1..=n).map(|k| format!("guest-{k}")).collect();
    for name in &names {
        store.text(&["create", name, "--from", &snap])?;
    }
    Ok(Golden { id, snap, digest: d.value(), size, names })
}

/// The golden snapshot and VDI still hold the pattern.
fn check_golden(store: &Store, g: &Golden) -> Result<()> {
    for source in [format!("@{}", g.snap), g.id.clone()] {
        let (got, len) = store.export_digest(&source)?;
        if got != g.digest || len != g.size {
            bail!("golden {source} changed: digest {got:016x}, want {:016x}", g.digest);
        }
    }
    Ok(())
}

fn test_in(args: &RingTestArgs, bins: &Bins, work: &Path) -> Result<()> {
    let n = args.guests as usize;
    let store = Store::new(&bins.vdi, work)?;
    let g = prepare_golden(&store, work, args.size, n)?;
    let (golden_id, snap, names) = (&g.id, &g.snap, &g.names);
    let before = store.allocated()?;
    eprintln!(
        "ring-test: golden VDI {golden_id} ({}), snapshot {snap}, {n} clones; {} ops per guest, {} in flight",
        sys::human(args.size),
        args.ops,
        args.depth
    );

    let (mut daemon, sock) = start_daemon(bins, &store, work, args.workers)?;
    let started = Instant::now();
    let mut children: Vec<(String, Child)> = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let child = Command::new(&bins.frontend)
            .arg("--socket")
            .arg(&sock)
            .args(["--vdi", name, "--guest", &(k + 1).to_string()])
            .args(["--seed", &(args.seed ^ (k as u64 + 1)).to_string()])
            .args(["--ops", &args.ops.to_string(), "--depth", &args.depth.to_string()])
            // Every other guest uses a 4-page ring and every fourth the 32-bit ABI.
            .args(["--ring-order", if k % 2 == 1 { "2" } else { "0" }])
            .args(["--abi", if k % 4 == 3 { "x86_32" } else { "x86_64" }])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the frontend for {name}"))?;
        children.push((name.clone(), child));
    }
    let summaries = wait_guests(children);
    let mut digests = Vec::new();
    let mut total_ops = 0u64;
    let mut total_bytes = 0u64;
    for (name, v) in summaries.iter().flatten() {
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        total_ops += num("ops");
        total_bytes += num("bytes");
        let digest = v.get("digest").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
        digests.push((name.clone(), digest));
        eprintln!(
            "ring-test: {name}: ok ({} reads, {} writes, {} barriers, {} flushes, {} discards)",
            num("reads"),
            num("writes"),
            num("barriers"),
            num("flushes"),
            num("discards")
        );
    }
    let elapsed = started.elapsed();
    daemon.check_alive()?;
    if args.kill {
        daemon.kill()?;
    } else {
        daemon.stop()?;
    }
    summaries?;
    eprintln!(
        "ring-test: {n} guests, {total_ops} requests ({}) in {:.1} s including the read-back: {:.0} requests/s",
        sys::human(total_bytes),
        elapsed.as_secs_f64(),
        total_ops as f64 / elapsed.as_secs_f64()
    );
    check_store(&store, &g, &digests)?;
    let after = store.allocated()?;
    eprintln!(
        "ring-test: the store grew by {} for {n} guests (each clone is {}; the golden data stays shared)",
        sys::human(after.saturating_sub(before)),
        sys::human(args.size)
    );
    eprintln!("ring-test: PASSED");
    Ok(())
}

/// With parallaxd stopped: each clone holds exactly what its guest's model says, the golden
/// snapshot and VDI still hold the pattern, and the store is consistent.
fn check_store(store: &Store, g: &Golden, digests: &[(String, String)]) -> Result<()> {
    let mut failures = Vec::new();
    for (name, want) in digests {
        let (got, len) = store.export_digest(name)?;
        if len != g.size || format!("{got:016x}") != *want {
            failures.push(format!("{name}: export digest {got:016x} ({len} bytes) but the guest's model says {want}"));
        }
    }
    if failures.is_empty() {
        eprintln!("ring-test: ok: every clone's export matches its guest's model");
    }
    if let Err(e) = check_golden(store, g) {
        failures.push(e.to_string());
    } else {
        eprintln!("ring-test: ok: the golden snapshot and VDI are unchanged");
    }
    store.text(&["check"]).context("`vdi check` found problems")?;
    eprintln!("ring-test: ok: `vdi check` finds the store consistent");
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

/// Flags of `ring-torture`.
#[derive(Debug, Args)]
pub struct RingTortureArgs {
    /// Times parallaxd is SIGKILLed while the guests write.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub kills: u32,
    /// Simulated guests, each on its own clone of the golden VDI.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub guests: u32,
    /// Size of the golden VDI (K/M/G binary).
    #[arg(long, default_value = "8M", value_parser = sys::parse_size)]
    pub size: u64,
    /// Requests each guest keeps in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub depth: u32,
    /// Seed of the kill times and the guests' mixes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the scratch directory and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

/// Runs ring-torture: guests write through the ring while parallaxd is SIGKILLed at random
/// moments; after each restart every guest checks every sector of its disk holds what its
/// last completed flush made durable or something it wrote after that.
pub fn run_torture(args: &RingTortureArgs) -> Result<()> {
    if args.size < 1 << 20 || !args.size.is_multiple_of(4096) {
        bail!("--size must be at least 1M and a multiple of 4K");
    }
    let bins = binaries(args.no_build)?;
    let dir = scratch("parallax-ring-torture-")?;
    let result = torture_in(args, &bins, dir.path());
    if args.keep || result.is_err() {
        eprintln!("ring-torture: kept {}", dir.keep().display());
    }
    result
}

/// One round's frontends: (name, process).
fn start_crash_guests(
    bins: &Bins,
    sock: &Path,
    work: &Path,
    g: &Golden,
    round: u64,
    ops: u64,
    args: &RingTortureArgs,
) -> Result<Vec<(String, Child)>> {
    let mut children = Vec::new();
    for (k, name) in g.names.iter().enumerate() {
        let state = work.join(format!("{name}.crash"));
        let child = Command::new(&bins.frontend)
            .arg("--socket")
            .arg(sock)
            .args(["--vdi", name, "--guest", &(k + 1).to_string()])
            .args(["--seed", &(args.seed ^ (round << 16) ^ (k as u64 + 1)).to_string()])
            .args(["--ops", &ops.to_string(), "--depth", &args.depth.to_string()])
            .args(["--round", &round.to_string()])
            .arg("--crash-state")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the frontend for {name}"))?;
        children.push((name.clone(), child));
    }
    Ok(children)
}

/// Waits for every frontend; each must exit 0 and print a JSON summary, returned by name.
fn wait_guests(children: Vec<(String, Child)>) -> Result<Vec<(String, serde_json::Value)>> {
    let n = children.len();
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    for (name, child) in children {
        let out = child.wait_with_output().with_context(|| format!("waiting for {name}'s frontend"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            failures.push(format!("{name}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("{name}'s frontend printed '{stdout}', not a JSON summary"))?;
        summaries.push((name, v));
    }
    if !failures.is_empty() {
        bail!("{} of {n} guests failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(summaries)
}

/// Waits for a round's crash-mode frontends; returns how many were cut short while running
/// and the flushes they completed.
fn wait_crash_guests(children: Vec<(String, Child)>) -> Result<(usize, u64)> {
    let (mut killed_running, mut flushes) = (0, 0);
    for (_, v) in wait_guests(children)? {
        flushes += v.get("flushes").and_then(serde_json::Value::as_u64).unwrap_or(0);
        if v.get("ran").and_then(serde_json::Value::as_u64) == Some(1) {
            killed_running += 1;
        }
    }
    Ok((killed_running, flushes))
}

fn torture_in(args: &RingTortureArgs, bins: &Bins, work: &Path) -> Result<()> {
    let store = Store::new(&bins.vdi, work)?;
    let g = prepare_golden(&store, work, args.size, args.guests as usize)?;
    eprintln!(
        "ring-torture: {} guests on {} clones of golden VDI {}, {} kills",
        args.guests,
        sys::human(args.size),
        g.id,
        args.kills
    );
    let mut rng = args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let (mut total_killed, mut total_flushes) = (0, 0);
    for round in 1..=u64::from(args.kills) {
        let (daemon, sock) = start_daemon(bins, &store, work, 4)?;
        let children = start_crash_guests(bins, &sock, work, &g, round, u64::MAX / 2, args)?;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(300 + rng % 1700);
        std::thread::sleep(delay);
        daemon.kill()?;
        let (killed, flushes) =
            wait_crash_guests(children).with_context(|| format!("round {round} (killed after {delay:?})"))?;
        total_killed += killed;
        total_flushes += flushes;
        eprintln!(
            "ring-torture: kill {round}/{} after {delay:?}: {killed} guests cut short while writing, {flushes} flushes completed (their disks are checked when the next round attaches)",
            args.kills
        );
    }
    // The last round only settles (checks) each disk and reads it all back, then stops cleanly.
    let (daemon, sock) = start_daemon(bins, &store, work, 4)?;
    let children = start_crash_guests(bins, &sock, work, &g, u64::from(args.kills) + 1, 0, args)?;
    wait_crash_guests(children).context("the final check")?;
    daemon.stop()?;
    check_golden(&store, &g)?;
    store.text(&["check"]).context("`vdi check` found problems")?;
    eprintln!(
        "ring-torture: PASSED: {} kills, {total_killed} guest runs cut short, {total_flushes} flushes checked; golden unchanged; vdi check clean",
        args.kills
    );
    Ok(())
}

/// One workload of bench-ring.
struct RingWorkload {
    title: &'static str,
    kind: &'static str,
    fio_rw: &'static str,
    bs: u64,
    dir: Dir,
}

const RING_WORKLOADS: [RingWorkload; 4] = [
    RingWorkload { title: "4 KiB random read", kind: "randread", fio_rw: "randread", bs: 4096, dir: Dir::Read },
    RingWorkload { title: "4 KiB random write", kind: "randwrite", fio_rw: "randwrite", bs: 4096, dir: Dir::Write },
    RingWorkload { title: "64 KiB sequential read", kind: "seqread", fio_rw: "read", bs: 65536, dir: Dir::Read },
    RingWorkload { title: "64 KiB sequential write", kind: "seqwrite", fio_rw: "write", bs: 65536, dir: Dir::Write },
];

/// Runs bench-ring.
pub fn run_bench(args: &BenchRingArgs) -> Result<()> {
    sys::require("fio", "fio", "bench-ring")?;
    let size = args.size.unwrap_or(if args.quick { 128 << 20 } else { 1 << 30 });
    let runtime = args.runtime.unwrap_or(if args.quick { 2 } else { 10 });
    let bins = binaries(args.no_build)?;
    let dir = scratch("parallax-bench-ring-")?;
    let work = dir.path();
    let store = Store::new(&bins.vdi, work)?;
    // Fill the disk with incompressible data so reads hit allocated blocks on both paths.
    let image = work.join("data.img");
    write_random(&image, size)?;
    store.text(&["create", "bench"])?;
    store.text(&["fill", "bench", &image.to_string_lossy()])?;
    std::fs::remove_file(&image).ok();
    let (mut daemon, sock) = start_daemon(&bins, &store, work, 4)?;
    let uri = format!("nbd://127.0.0.1:{}/bench", daemon.port);
    let mut rows = Vec::new();
    for w in &RING_WORKLOADS {
        let ring = ring_bench(&bins, &sock, w, args.depth, runtime)?;
        daemon.check_alive()?;
        let fw = Workload { title: w.title, rw: w.fio_rw, bs: w.bs, iodepth: args.depth, dir: w.dir, fsync: 0 };
        let nbd = fio::run(&uri, &fw, Span::Time { size, runtime, ramp: 0 })?;
        daemon.check_alive()?;
        eprintln!("bench-ring: {}: ring {:.0} IOPS, NBD {:.0} IOPS", w.title, ring.0, nbd.iops);
        rows.push(vec![
            w.title.to_string(),
            report::thousands(ring.0),
            format!("{:.1}", ring.1),
            report::thousands(nbd.iops),
            format!("{:.1}", nbd.bw_bytes / f64::from(1 << 20)),
            report::ratio(ring.0, nbd.iops),
        ]);
    }
    daemon.stop()?;
    let header: Vec<String> = [
        "workload (QD ".to_string() + &args.depth.to_string() + ")",
        "ring IOPS".into(),
        "ring MiB/s".into(),
        "NBD IOPS".into(),
        "NBD MiB/s".into(),
        "ring / NBD".into(),
    ]
    .into_iter()
    .collect();
    println!("\n{}", report::machine());
    println!(
        "VDI of {} filled with random data; {runtime} s per run; parallaxd with 4 ring workers.\n",
        sys::human(size)
    );
    println!("{}", report::table(&header, &rows));
    Ok(())
}

fn ring_bench(bins: &Bins, sock: &Path, w: &RingWorkload, depth: u32, runtime: u64) -> Result<(f64, f64)> {
    let mut cmd = Command::new(&bins.frontend);
    cmd.arg("--socket").arg(sock).args(["--vdi", "bench", "--bench", w.kind, "--bs", &w.bs.to_string()]).args([
        "--depth",
        &depth.to_string(),
        "--seconds",
        &runtime.to_string(),
    ]);
    let what = sys::describe(&cmd);
    let text = sys::run_text(&mut cmd)?;
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("`{what}` printed '{text}', not JSON"))?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).with_context(|| format!("no {k} from `{what}`"));
    Ok((num("iops")?, num("mib_s")?))
}

fn write_random(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).context("cannot create the data image")?);
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).context("writing the data image")?;
        left -= n as u64;
    }
    f.flush().context("writing the data image")?;
    Ok(())
}
