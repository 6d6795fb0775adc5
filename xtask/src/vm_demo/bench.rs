//! `cargo xtask bench-vhost [--runs N]`: one guest, its disk on vhost-user-blk, served by
//! parallaxd (a clone of a golden VDI) and, beside it in the same run, by qemu-storage-daemon (a
//! qcow2 overlay on the golden raw image). The guest times its boot and a `dd` read of the
//! whole disk and a 16 MiB `dd` write with fsync; the table gives each and the ratio
//! (qemu-storage-daemon's time / parallaxd's: above 1 means parallaxd is faster).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::guest::{self, Boot, Disk, Outcome};
use super::{IMAGE_SIZE, Vdi, image, setup};
use crate::parallaxd::Daemon;
use crate::sys;

/// Flags of `bench-vhost`.
#[derive(Debug, Args)]
pub struct BenchVhostArgs {
    /// Boots per server (alternating between the two).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Use the binaries already in target/release.
    #[arg(long)]
    pub no_build: bool,
    /// Do not install missing packages with apt; fail instead.
    #[arg(long)]
    pub no_install: bool,
    /// Drive the servers from a host-side vhost-user client instead of booting a guest: fixed
    /// queue depths and request sizes, IOPS per row (no emulated CPU in the way).
    #[arg(long)]
    pub host_client: bool,
    /// With --host-client: seconds per row.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// With --host-client: run only the rows whose name contains this (repeatable), e.g.
    /// `--row "1 MiB"`.
    #[arg(long)]
    pub row: Vec<String>,
}

/// The bench guest's /sbin/init: time a read of the whole disk and a synced 16 MiB write, from
/// /proc/uptime (1/100 s), and power off.
const BENCH_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
t() { cut -d' ' -f1 /proc/uptime; }
T0=$(t)
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
T1=$(t)
dd if=/dev/zero of=/bench.dat bs=1M count=16 conv=fsync 2>/dev/null
T2=$(t)
rm -f /bench.dat
sync
echo "BENCH boot=$T0 read=$T1 write=$T2"
mount -o remount,ro /
poweroff -f
"#;

/// One boot's figures, in seconds.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Kernel start to init.
    boot: f64,
    /// `dd` of the whole disk.
    read: f64,
    /// 16 MiB written with fsync.
    write: f64,
    /// QEMU's start to its exit.
    total: f64,
}

fn figures(o: &Outcome) -> Result<Figures> {
    let line = o
        .console
        .lines()
        .find_map(|l| l.find("BENCH ").map(|at| &l[at + "BENCH ".len()..]))
        .with_context(|| format!("{}: no BENCH line ({}):\n{}", o.name, o.status, guest::console_tail(o)))?;
    let field = |k: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k}= in `{line}`"))
    };
    let (t0, t1, t2) = (field("boot")?, field("read")?, field("write")?);
    Ok(Figures { boot: t0, read: t1 - t0, write: t2 - t1, total: o.elapsed.as_secs_f64() })
}

/// Runs the benchmark.
pub fn run(args: &BenchVhostArgs) -> Result<()> {
    setup::ensure_packages(args.no_install)?;
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], args.no_build)?;
    let dir = tempfile::Builder::new().prefix("parallax-bench-vhost-").tempdir().context("cannot create a temp dir")?;
    if args.host_client {
        return super::bench_host::run_in(args, &bins[0], &bins[1], dir.path());
    }
    run_in(args, &bins[0], &bins[1], dir.path())
}

fn run_in(args: &BenchVhostArgs, parallaxd: &Path, vdi_bin: &Path, work: &Path) -> Result<()> {
    let runs = args.runs as usize;
    let kernel = image::fetch_kernel(&sys::release_dir().with_file_name("vm-demo"))?;
    let initrd = image::build_initramfs(&kernel, work)?;
    let golden = image::build_rootfs(work, IMAGE_SIZE, BENCH_INIT)?;
    let (vdi, snap) = golden_store(vdi_bin, work, &golden)?;
    let names: Vec<String> = (1..=runs).map(|k| format!("bench-{k}")).collect();
    for name in &names {
        vdi.text(&["create", name, "--from", &snap])?;
    }
    let (px_sockets, qsd_sockets) = (work.join("px"), work.join("qsd"));
    std::fs::create_dir(&px_sockets).context("socket dir")?;
    std::fs::create_dir(&qsd_sockets).context("socket dir")?;
    let extra: Vec<std::ffi::OsString> = names
        .iter()
        .flat_map(|n| {
            ["--vhost-user-blk".into(), format!("{}={n}", px_sockets.join(format!("{n}.sock")).display()).into()]
        })
        .collect();
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_os_str()).collect();
    let log = work.join("parallaxd.log");
    let mut daemon = Daemon::start(parallaxd, &vdi.store, &vdi.run_dir, &log, &extra)?;
    let (mut px, mut qsd) = (Vec::new(), Vec::new());
    for name in &names {
        px.push(boot_one(&kernel, &initrd, work, &px_sockets, "parallaxd", name)?);
        let overlay = work.join(format!("{name}.qcow2"));
        qcow2_overlay(&golden, &overlay)?;
        let mut server = QemuStorageDaemon::start(&overlay, &qsd_sockets.join(format!("{name}.sock")), work)?;
        let f = boot_one(&kernel, &initrd, work, &qsd_sockets, "qsd", name);
        server.stop();
        qsd.push(f?);
    }
    daemon.check_alive()?;
    daemon.stop()?;
    print_table(runs, &px, &qsd);
    Ok(())
}

/// A store in `work` holding VDI `golden` filled from the image `golden` and snapshotted;
/// returns the store and the snapshot's id, to clone from.
pub(super) fn golden_store(vdi_bin: &Path, work: &Path, golden: &Path) -> Result<(Vdi, String)> {
    let run_dir = work.join("run");
    std::fs::create_dir(&run_dir).context("cannot create the run dir")?;
    let vdi = Vdi { bin: vdi_bin.to_path_buf(), store: work.join("blockstore.dat"), run_dir };
    let id = vdi.text(&["create", "golden"])?;
    vdi.text(&["fill", &id, &golden.to_string_lossy()])?;
    let snap = vdi.text(&["snap", &id])?;
    Ok((vdi, snap))
}

/// Creates `overlay`, a qcow2 image whose backing file is the raw image `golden`.
pub(super) fn qcow2_overlay(golden: &Path, overlay: &Path) -> Result<()> {
    sys::run(
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(golden).arg(overlay),
    )?;
    Ok(())
}

/// Boots guest `name` with its disk on `sockets/NAME.sock` and reads its figures.
fn boot_one(
    kernel: &image::Kernel,
    initrd: &Path,
    work: &Path,
    sockets: &Path,
    round: &'static str,
    name: &str,
) -> Result<Figures> {
    let b = Boot {
        vmlinuz: &kernel.vmlinuz,
        initrd,
        disk: Disk::VhostUser(sockets),
        timeout: Duration::from_secs(180),
        log_dir: work,
        round,
    };
    let o = guest::boot_all(&b, &[name.to_string()])?;
    figures(&o[0])
}

/// qemu-storage-daemon exporting a qcow2 image over vhost-user-blk.
pub(super) struct QemuStorageDaemon(Child);

impl QemuStorageDaemon {
    pub(super) fn start(image: &Path, socket: &Path, work: &Path) -> Result<QemuStorageDaemon> {
        let log = std::fs::File::create(work.join("qsd.log")).context("qsd log")?;
        let mut c = Command::new("qemu-storage-daemon");
        c.args(["--blockdev", &format!("driver=file,node-name=file,filename={}", image.display())]);
        c.args(["--blockdev", "driver=qcow2,node-name=disk,file=file"]);
        c.args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=2",
                socket.display()
            ),
        ]);
        eprintln!("xtask: starting {}", sys::describe(&c));
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().context("qemu-storage-daemon")?;
        let mut d = QemuStorageDaemon(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(st)) = d.0.try_wait() {
                bail!("qemu-storage-daemon exited ({st}); see {}", work.join("qsd.log").display());
            }
            if Instant::now() > deadline {
                d.stop();
                bail!("qemu-storage-daemon did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub(super) fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(runs: usize, px: &[Figures], qsd: &[Figures]) {
    let m = |f: &[Figures], get: fn(&Figures) -> f64| median(f.iter().map(get).collect());
    println!("## bench-vhost ({runs} boot(s) per server, medians)\n");
    println!("| what | parallaxd (clone of a VDI) | qemu-storage-daemon (qcow2 overlay) | ratio |");
    println!("|---|--:|--:|--:|");
    type Column = fn(&Figures) -> f64;
    let rows: [(&str, Column); 4] = [
        ("kernel start to init", |f| f.boot),
        ("dd read of the whole 64 MiB disk", |f| f.read),
        ("dd write 16 MiB, fsync", |f| f.write),
        ("QEMU start to power-off", |f| f.total),
    ];
    for (what, get) in rows {
        let (a, b) = (m(px, get), m(qsd, get));
        println!("| {what} | {a:.2} s | {b:.2} s | {:.2}× |", b / a.max(0.001));
    }
    println!("\nratio: qemu-storage-daemon's time / parallaxd's (above 1: parallaxd faster).");
}
