//! `cargo xtask cluster`: a throwaway single-node Ceph cluster (bluestore OSD) and parallaxd
//! hosts on one store in RADOS. Checks, each with fio's verify over NBD:
//! - host-a serves: a golden VDI written, snapshotted, cloned three times; each clone reads the
//!   golden data, is written with its own, and the snapshot keeps the golden data;
//! - host-a is SIGKILLed; host-b is refused while host-a's lease runs, takes over at once with
//!   `vdi takeover` (fencing host-a) and serves everything flushed, `vdi check` clean;
//! - host-b is SIGKILLed; host-c waits the lease out and opens (fencing host-b);
//! - host-c stops cleanly and host-a opens at once: the hand-over of a live store;
//! - `vdi info` counts the pool's used bytes as its quota does (object lengths), which on
//!   BlueStore is far more than `ceph df`'s STORED for a store's sparse reservations.
//!
//! Then, unless `--no-bench`, fio rows through parallaxd's NBD export on RADOS beside `qemu-nbd`
//! serving an RBD image of the same cluster (docs/performance.md).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ceph::{Ceph, ObjectStore, ceph_cmd};
use crate::fio::{self, Dir, Span, Workload};
use crate::parallaxd::Daemon;
use crate::servers::{Binaries, QEMU_CACHE};
use crate::{report, sys};

/// Flags of `cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Seconds per benchmark row.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Only the checks, no benchmark rows.
    #[arg(long)]
    pub no_bench: bool,
    /// Size of each VDI (and of the RBD image), K/M/G binary.
    #[arg(long, value_parser = sys::parse_size, default_value = "256M")]
    pub size: u64,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

/// The store every host serves.
const STORE: &str = "rados:parallax/cluster";
/// Its pool, for `vdi cluster`.
const STORE_POOL: &str = "rados:parallax";
/// The lease the hosts run with (seconds): short, so the expiry check is quick.
const LEASE_SECS: u64 = 6;

/// One parallaxd host: its name, run directory (control socket) and log.
struct Host<'a> {
    name: &'static str,
    work: &'a Path,
    bins: &'a Binaries,
    conf: &'a Path,
}

impl Host<'_> {
    fn run_dir(&self) -> PathBuf {
        self.work.join(self.name)
    }

    fn flags(&self) -> Vec<OsString> {
        let mut f: Vec<OsString> = ["--host", self.name, "--ceph-conf"].map(OsString::from).into();
        f.push(self.conf.into());
        f.extend(["--lease".into(), format!("{LEASE_SECS}s").into()]);
        f
    }

    fn start(&self) -> Result<Daemon> {
        std::fs::create_dir_all(self.run_dir())?;
        let log = self.work.join(format!("{}.log", self.name));
        let flags = self.flags();
        let flags: Vec<&OsStr> = flags.iter().map(OsString::as_os_str).collect();
        Daemon::start(&self.bins.parallaxd, Path::new(STORE), &self.run_dir(), &log, &flags)
    }

    /// Starts parallaxd expecting it to be refused because another host holds the store.
    fn expect_refused(&self, holder: &str) -> Result<()> {
        std::fs::create_dir_all(self.run_dir())?;
        let out = Command::new(&self.bins.parallaxd)
            .args(["--store", STORE, "--nbd", &format!("127.0.0.1:{}", sys::free_port()?)])
            .args(self.flags())
            .env("PARALLAX_RUN_DIR", self.run_dir())
            .output()
            .context("starting parallaxd")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains(&format!("host {holder}")) {
            bail!("{} was not refused with {holder} named as the holder ({}): {err}", self.name, out.status);
        }
        eprintln!("xtask: {} refused, as it should be: {}", self.name, err.trim().lines().last().unwrap_or(""));
        Ok(())
    }

    /// `vdi` on this host (through its daemon when one runs).
    fn vdi(&self, args: &[&str]) -> Result<String> {
        self.vdi_at(STORE, args)
    }

    /// `vdi --store STORE` on this host.
    fn vdi_at(&self, store: &str, args: &[&str]) -> Result<String> {
        std::fs::create_dir_all(self.run_dir())?;
        sys::run_text(
            Command::new(&self.bins.vdi)
                .args(["--store", store, "--host", self.name, "--ceph-conf"])
                .arg(self.conf)
                .args(args)
                .env("PARALLAX_RUN_DIR", self.run_dir()),
        )
    }
}

/// fio writing (`verify = false`) or verifying the pattern of `seed` over a whole export.
fn fio_pattern(port: u16, export: &str, size: u64, seed: u32, verify: bool) -> Result<()> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=pattern",
        "--ioengine=nbd",
        &format!("--uri=nbd://127.0.0.1:{port}/{export}"),
        "--rw=write",
        "--bs=64k",
        "--iodepth=8",
        &format!("--size={size}"),
        "--verify=crc32c",
        &format!("--randseed={seed}"),
        "--verify_state_save=0",
        "--verify_fatal=1",
    ]);
    if verify {
        cmd.arg("--verify_only");
    } else {
        cmd.args(["--do_verify=0", "--end_fsync=1"]);
    }
    sys::run(&mut cmd)
        .with_context(|| format!("{} {export} with pattern {seed}", if verify { "verifying" } else { "writing" }))?;
    Ok(())
}

/// The store's two journal slots at the default size: reserved by length at creation, written
/// a record at a time.
const JOURNAL_BYTES: u64 = 2 * 8192 * 4096;

/// `vdi info`'s pool figures on BlueStore: `used` is what the quota counts, the sum of object
/// lengths, so it holds at least the journal's reserved length, while `ceph df`'s STORED
/// (bytes written) is well below it. Waits up to 60 s for the mgr to have the figures.
fn check_pool_room(h: &Host<'_>, conf: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info: serde_json::Value = serde_json::from_str(&h.vdi(&["info", "--json"])?)?;
        let df: serde_json::Value =
            serde_json::from_str(&sys::run_text(ceph_cmd(conf, "ceph").args(["df", "detail", "--format", "json"]))?)?;
        let stored = df["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "parallax"))
            .and_then(|p| p["stats"]["stored"].as_u64());
        if let (Some(used), Some(stored)) = (info["medium"]["used"].as_u64(), stored)
            && used >= JOURNAL_BYTES
        {
            if stored >= used {
                bail!(
                    "ceph df's STORED ({stored}) is not below vdi info's used ({used}): BlueStore should tell them apart"
                );
            }
            eprintln!("xtask: pool room: vdi info counts {used} bytes used (object lengths), ceph df {stored} STORED");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("vdi info never showed the pool's usage (at least the journal's {JOURNAL_BYTES} bytes): {info}");
        }
        // The mgr has no event for a client to wait on: its figures come with the OSDs' reports.
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `cargo xtask cluster`.
pub fn run(a: &ClusterArgs) -> Result<()> {
    let t0 = Instant::now();
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], a.no_build)?;
    let bins = Binaries { parallaxd: bins[0].clone(), vdi: bins[1].clone() };
    sys::require("fio", "fio", "cluster")?;
    sys::require("qemu-nbd", "qemu-utils", "cluster")?;
    sys::require("rbd", "ceph-common", "cluster")?;
    let (module, package) = crate::setup::QEMU_RBD_MODULE;
    if !a.no_bench && !crate::setup::qemu_module_installed(module) {
        anyhow::bail!(
            "cluster's benchmark serves an RBD image with qemu-nbd, which needs QEMU's {module} (package {package}, \
             from the same release as qemu-utils; `cargo xtask test --setup-only` installs it)"
        );
    }
    let work = tempfile::Builder::new().prefix("parallax-cluster-").tempdir()?;
    // A mgr: the pool's usage figures (`vdi info`, `vdi cluster`) come from it.
    let mut ceph = Ceph::start(&work.path().join("ceph"), ObjectStore::Bluestore, true)?;
    ceph.create_pool("parallax")?;
    let conf = ceph.conf.clone();
    let host = |name| Host { name, work: work.path(), bins: &bins, conf: &conf };
    let (ha, hb, hc) = (host("host-a"), host("host-b"), host("host-c"));
    let size = a.size;
    let clones = ["clone-1", "clone-2", "clone-3"];

    // host-a: a golden image, a snapshot, clones; every clone its own data.
    let d = ha.start()?;
    ha.vdi(&["create", "golden", "--size", &sys::size_arg(size)])?;
    fio_pattern(d.port, "golden", size, 1, false)?;
    ha.vdi(&["snap", "golden", "base"])?;
    for (i, c) in clones.iter().enumerate() {
        ha.vdi(&["create", c, "--from", "golden@base"])?;
        fio_pattern(d.port, c, size, 1, true)?;
        fio_pattern(d.port, c, size / 2, 10 + i as u32, false)?;
    }
    fio_pattern(d.port, "golden@base", size, 1, true)?;
    eprintln!("xtask: host-a wrote golden, golden@base and {} clones, each verified", clones.len());
    // Any other host sees what host-a serves: `vdi list` there answers from host-a's catalog.
    let seen = hb.vdi(&["list"])?;
    if !seen.contains("served by host host-a") || !clones.iter().chain(&["golden"]).all(|c| seen.contains(c)) {
        bail!("host-b's `vdi list` does not show host-a's VDIs:\n{seen}");
    }
    let pool = hc.vdi_at(STORE_POOL, &["cluster"])?;
    if !pool.contains(&format!("{STORE} is served by host host-a")) || !pool.contains("golden") {
        bail!("host-c's `vdi cluster` does not show host-a's store:\n{pool}");
    }
    eprintln!("xtask: host-b and host-c list host-a's VDIs from its catalog");
    let verify_all = |port: u16, who: &str| -> Result<()> {
        fio_pattern(port, "golden@base", size, 1, true)?;
        for (i, c) in clones.iter().enumerate() {
            fio_pattern(port, c, size / 2, 10 + i as u32, true)?;
        }
        eprintln!("xtask: {who}: golden@base and every clone hold what was flushed");
        Ok(())
    };

    // host-a dies; host-b is refused until it takes over.
    d.kill()?;
    hb.expect_refused("host-a")?;
    let said = hb.vdi(&["takeover"])?;
    if !said.contains("fenced host host-a") {
        bail!("vdi takeover did not fence host-a: {said}");
    }
    let d = hb.start()?;
    verify_all(d.port, "host-b after taking over from SIGKILLed host-a")?;
    let check = hb.vdi(&["check"])?;
    if !check.contains("consistent") {
        bail!("vdi check on host-b: {check}");
    }

    // host-b dies; host-c waits the lease out (no takeover) and opens.
    d.kill()?;
    hc.expect_refused("host-b")?;
    // A fixed wait, not a poll: the lease's length is the thing under test.
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 1));
    let d = hc.start()?;
    verify_all(d.port, "host-c after host-b's lease ran out")?;

    // A live hand-over: host-c stops cleanly, host-a opens at once.
    d.stop()?;
    let d = ha.start()?;
    verify_all(d.port, "host-a after host-c handed the store over")?;
    check_pool_room(&ha, &conf)?;
    ceph.check_alive()?;
    eprintln!("xtask: cluster checks passed in {:.0} s", t0.elapsed().as_secs_f64());

    if !a.no_bench {
        bench(&ha, &d, &ceph, size, a.seconds)?;
    }
    d.stop()?;
    drop(ceph);
    Ok(())
}

/// Clones in the boot storm.
const STORM_CLONES: usize = 8;
/// Bytes each storm clone writes first (4 KiB random writes, copy-on-write of the golden image).
const STORM_WRITE: u64 = 16 << 20;

/// fio with one job per NBD URI at once (4 KiB random writes, QD4 each, flushed at the end):
/// the aggregate IOPS and the wall time.
fn fio_storm(uris: &[String]) -> Result<(f64, Duration)> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("fio.json");
    let mut cmd = Command::new("fio");
    cmd.args(["--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=4", "--end_fsync=1", "--group_reporting"]);
    cmd.args([format!("--size={STORM_WRITE}"), "--output-format=json".into(), format!("--output={}", out.display())]);
    for (i, u) in uris.iter().enumerate() {
        cmd.args([format!("--name=vm{i}"), format!("--uri={u}")]);
    }
    let t = Instant::now();
    sys::run(&mut cmd)?;
    let took = t.elapsed();
    let r = fio::parse(&std::fs::read_to_string(&out)?, Dir::Write)?;
    Ok((r.iops, took))
}

/// Golden-image boot storm: `n` clones of a golden snapshot created, then all first-written at
/// once — parallaxd clones (`vdi create --from`) beside RBD clones (`rbd clone`, each served by
/// its own qemu-nbd).
fn boot_storm(ha: &Host<'_>, d: &Daemon, ceph: &Ceph, size: u64, n: usize) -> Result<Vec<Vec<String>>> {
    let t = Instant::now();
    for i in 0..n {
        ha.vdi(&["create", &format!("storm-{i}"), "--from", "golden@base"])?;
    }
    let ours_create = t.elapsed();
    let uris: Vec<String> = (0..n).map(|i| format!("nbd://127.0.0.1:{}/storm-{i}", d.port)).collect();
    let (ours_iops, ours_took) = fio_storm(&uris)?;

    let rbd = |args: &[&str]| sys::run(ceph_cmd(&ceph.conf, "rbd").args(args));
    rbd(&["create", "rbd/golden", "--size", &format!("{}M", size >> 20)])?;
    let golden = QemuNbd::start(ceph, "rbd/golden")?;
    fio::run(&golden.uri(), &fio::FILL, Span::Bytes(size))?;
    drop(golden);
    rbd(&["snap", "create", "rbd/golden@base"])?;
    rbd(&["snap", "protect", "rbd/golden@base"])?;
    let t = Instant::now();
    for i in 0..n {
        rbd(&["clone", "rbd/golden@base", &format!("rbd/storm-{i}")])?;
    }
    let theirs_create = t.elapsed();
    let servers = (0..n).map(|i| QemuNbd::start(ceph, &format!("rbd/storm-{i}"))).collect::<Result<Vec<_>>>()?;
    let uris: Vec<String> = servers.iter().map(QemuNbd::uri).collect();
    let (theirs_iops, theirs_took) = fio_storm(&uris)?;
    drop(servers);
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let iops = |x: f64, took: Duration| format!("{} IOPS ({:.1} s)", report::thousands(x), took.as_secs_f64());
    eprintln!(
        "xtask: boot storm of {n}: create {} / {}, first writes {} / {}",
        ms(ours_create),
        ms(theirs_create),
        iops(ours_iops, ours_took),
        iops(theirs_iops, theirs_took)
    );
    Ok(vec![
        vec![
            format!("boot storm: create {n} clones of a golden snapshot (time, lower is better)"),
            ms(ours_create),
            ms(theirs_create),
            report::ratio(theirs_create.as_secs_f64(), ours_create.as_secs_f64()),
        ],
        vec![
            format!("boot storm: {n} clones first-written at once, 4 KiB random QD4, {} each", sys::human(STORM_WRITE)),
            iops(ours_iops, ours_took),
            iops(theirs_iops, theirs_took),
            report::ratio(ours_iops, theirs_iops),
        ],
    ])
}

/// qemu-nbd serving an RBD image of the cluster, stopped on drop.
struct QemuNbd {
    child: std::process::Child,
    port: u16,
}

impl QemuNbd {
    fn start(ceph: &Ceph, image: &str) -> Result<QemuNbd> {
        let port = sys::free_port()?;
        let spec = format!("rbd:{image}:conf={}", ceph.conf.display());
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "-x", "bench", "-b", "127.0.0.1", "-p", &port.to_string()]).args(QEMU_CACHE);
        let mut child =
            cmd.arg(&spec).stdin(std::process::Stdio::null()).spawn().context("starting qemu-nbd on RBD")?;
        if let Err(e) = crate::servers::wait_listening(port, || Ok(())) {
            let _ = crate::servers::terminate(&mut child);
            return Err(e.context(format!("qemu-nbd on {spec} did not start")));
        }
        Ok(QemuNbd { child, port })
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/bench", self.port)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = crate::servers::terminate(&mut self.child);
    }
}

/// The rows measured, parallaxd on RADOS beside qemu-nbd on RBD.
const ROWS: [Workload; 4] = [
    Workload { title: "4 KiB random read, QD16", rw: "randread", bs: 4096, iodepth: 16, dir: Dir::Read, fsync: 0 },
    Workload { title: "4 KiB random write, QD16", rw: "randwrite", bs: 4096, iodepth: 16, dir: Dir::Write, fsync: 0 },
    Workload { title: "1 MiB sequential read, QD4", rw: "read", bs: 1 << 20, iodepth: 4, dir: Dir::Read, fsync: 0 },
    Workload { title: "1 MiB sequential write, QD4", rw: "write", bs: 1 << 20, iodepth: 4, dir: Dir::Write, fsync: 0 },
];

fn bench(ha: &Host<'_>, d: &Daemon, ceph: &Ceph, size: u64, seconds: u64) -> Result<()> {
    ha.vdi(&["create", "bench", "--size", &sys::size_arg(size)])?;
    let ours = format!("nbd://127.0.0.1:{}/bench", d.port);
    fio::run(&ours, &fio::FILL, Span::Bytes(size))?;
    // The peer: an RBD image in its own pool, served by qemu-nbd (qemu-block-extra's rbd driver).
    ceph.create_pool("rbd")?;
    sys::run(ceph_cmd(&ceph.conf, "rbd").args(["pool", "init", "rbd"]))?;
    sys::run(ceph_cmd(&ceph.conf, "rbd").args(["create", "rbd/bench", "--size", &format!("{}M", size >> 20)]))?;
    let peer = QemuNbd::start(ceph, "rbd/bench")?;
    let theirs = peer.uri();
    fio::run(&theirs, &fio::FILL, Span::Bytes(size))?;
    let span = Span::Time { size, runtime: seconds, ramp: 1 };
    let mut rows = Vec::new();
    for w in &ROWS {
        let p = fio::run(&ours, w, span)?;
        let q = fio::run(&theirs, w, span)?;
        let show = |r: &fio::Result1| {
            if w.sequential() {
                format!("{:.0} MiB/s", r.bw_bytes / f64::from(1 << 20))
            } else {
                format!("{} IOPS", report::thousands(r.iops))
            }
        };
        eprintln!("xtask: {}: parallaxd {} / qemu-nbd+rbd {}", w.title, show(&p), show(&q));
        rows.push(vec![w.title.to_string(), show(&p), show(&q), report::ratio(p.iops, q.iops)]);
    }
    drop(peer);

    rows.extend(boot_storm(ha, d, ceph, size, STORM_CLONES)?);
    let header = ["workload", "parallaxd (RADOS)", "qemu-nbd (RBD)", "ratio"].map(String::from);
    println!("\n{}", report::machine());
    println!("{seconds} s per row, {} VDI/image, one bluestore OSD on a sparse file, pool size 1\n", sys::human(size));
    println!("{}", report::table(&header, &rows));
    Ok(())
}
