//! `bench-vhost --host-client`: the servers driven by a host-side vhost-user client
//! ([`super::vhost_client`]) at fixed queue depths, so the rows measure the servers'
//! request paths, not a guest's emulated CPU. Three servers, each on its own copy-on-write
//! child of one golden image: parallaxd (a clone of a VDI), parallaxd with one request thread
//! per queue (`--vhost-user-workers 1`: the queue's requests one after another, as before the
//! worker pool), and qemu-storage-daemon (a qcow2 overlay on the golden raw image).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::bench::{BenchVhostArgs, QemuStorageDaemon, golden_store, median, qcow2_overlay};
use super::vhost_client::{Client, Workload};
use crate::parallaxd::Daemon;

/// The golden image's size.
const DISK: u64 = 256 << 20;
/// Largest request of any row.
const MAX_BLOCK: u32 = 1 << 20;
/// Deepest queue of any row.
const MAX_DEPTH: u16 = 16;

/// The rows: name and workload (its time is set from the flags).
fn rows(time: Duration) -> Vec<(&'static str, Workload)> {
    let w = |write, block, random, depth| Workload { write, block, random, depth, time };
    vec![
        ("4 KiB random read, QD1", w(false, 4096, true, 1)),
        ("4 KiB random read, QD16", w(false, 4096, true, 16)),
        ("4 KiB random write, QD1", w(true, 4096, true, 1)),
        ("4 KiB random write, QD16", w(true, 4096, true, 16)),
        ("1 MiB sequential read, QD4", w(false, 1 << 20, false, 4)),
        ("1 MiB sequential write, QD4", w(true, 1 << 20, false, 4)),
    ]
}

/// The servers, in run order.
const SERVERS: [&str; 3] = ["parallaxd", "parallaxd, 1 worker/queue", "qemu-storage-daemon"];

pub(super) fn run_in(args: &BenchVhostArgs, parallaxd: &Path, vdi_bin: &Path, work: &Path) -> Result<()> {
    let golden = work.join("golden.raw");
    write_random(&golden, DISK)?;
    let (vdi, snap) = golden_store(vdi_bin, work, &golden)?;
    let mut rows = rows(Duration::from_secs(args.seconds));
    if !args.row.is_empty() {
        rows.retain(|(what, _)| args.row.iter().any(|r| what.contains(r.as_str())));
        if rows.is_empty() {
            bail!("no row matches --row {:?}", args.row);
        }
    }
    // figures[server][row] = IOPS of each round.
    let mut figures = vec![vec![Vec::new(); rows.len()]; SERVERS.len()];
    for round in 1..=args.runs {
        for (s, server) in SERVERS.iter().enumerate() {
            let name = format!("r{round}-s{s}");
            let socket = work.join(format!("{name}.sock"));
            eprintln!("xtask: bench-vhost --host-client: round {round}, {server}");
            let server = match s {
                0 | 1 => {
                    vdi.text(&["create", &name, "--from", &snap])?;
                    let mut extra: Vec<String> =
                        vec!["--vhost-user-blk".into(), format!("{}={name}", socket.display())];
                    if s == 1 {
                        extra.extend(["--vhost-user-workers".into(), "1".into()]);
                    }
                    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
                    let log = work.join(format!("parallaxd-{name}.log"));
                    Server::Parallaxd(Daemon::start(parallaxd, &vdi.store, &vdi.run_dir, &log, &extra)?)
                }
                _ => {
                    let overlay = work.join(format!("{name}.qcow2"));
                    qcow2_overlay(&golden, &overlay)?;
                    Server::QemuStorageDaemon(QemuStorageDaemon::start(&overlay, &socket, work)?)
                }
            };
            let measured = measure(&socket, &golden, &rows, round.into());
            server.stop()?;
            for (r, iops) in measured?.into_iter().enumerate() {
                figures[s][r].push(iops);
            }
        }
    }
    print_table(args, &rows, &figures);
    Ok(())
}

/// One of the servers, running.
enum Server {
    Parallaxd(Daemon),
    QemuStorageDaemon(QemuStorageDaemon),
}

impl Server {
    /// Stops it; parallaxd must still be running and stop cleanly.
    fn stop(self) -> Result<()> {
        match self {
            Server::Parallaxd(mut d) => {
                d.check_alive()?;
                d.stop()
            }
            Server::QemuStorageDaemon(mut q) => {
                q.stop();
                Ok(())
            }
        }
    }
}

/// Connects to `socket`, checks that the disk reads as the golden image (a sample of 64
/// blocks), warms up for a second and runs every row, returning their IOPS.
fn measure(socket: &Path, golden: &Path, rows: &[(&str, Workload)], seed: u64) -> Result<Vec<f64>> {
    use std::os::unix::fs::FileExt;
    wait_for_socket(socket)?;
    let mut client = Client::connect(socket, DISK, MAX_BLOCK, MAX_DEPTH)?;
    let image = std::fs::File::open(golden).context("golden image")?;
    for k in 0..64u64 {
        let offset = (k * 7919 % (DISK / 4096)) * 4096;
        let mut want = vec![0u8; 4096];
        image.read_exact_at(&mut want, offset).context("golden image")?;
        if client.read(offset, 4096)? != want {
            bail!("{}: the block at {offset} does not read as the golden image", socket.display());
        }
    }
    let warm_up = Workload { write: false, block: 4096, random: true, depth: MAX_DEPTH, time: Duration::from_secs(1) };
    client.run(&warm_up, seed)?;
    rows.iter()
        .enumerate()
        .map(|(r, (what, w))| {
            let o = client.run(w, seed * 1000 + r as u64).with_context(|| format!("row `{what}`"))?;
            Ok(o.iops())
        })
        .collect()
}

fn wait_for_socket(socket: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Writes `len` bytes of pseudo-random data (incompressible, all blocks different).
fn write_random(path: &Path, len: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).context("golden image")?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..len / chunk.len() as u64 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).context("golden image")?;
    }
    f.flush().context("golden image")?;
    Ok(())
}

fn print_table(args: &BenchVhostArgs, rows: &[(&str, Workload)], figures: &[Vec<Vec<f64>>]) {
    println!(
        "## bench-vhost --host-client ({} round(s), {} s per row, medians; 256 MiB golden image)\n",
        args.runs, args.seconds
    );
    println!("| workload | {} | {} | {} | parallaxd / qsd | 4 workers / 1 |", SERVERS[0], SERVERS[1], SERVERS[2]);
    println!("|---|--:|--:|--:|--:|--:|");
    for (r, (what, w)) in rows.iter().enumerate() {
        let m: Vec<f64> = figures.iter().map(|s| median(s[r].clone())).collect();
        let cell = |iops: f64| {
            if w.block >= 1 << 20 {
                format!("{:.0} MiB/s", iops * f64::from(w.block) / f64::from(1u32 << 20))
            } else {
                format!("{iops:.0} IOPS")
            }
        };
        println!(
            "| {what} | {} | {} | {} | {:.2}× | {:.2}× |",
            cell(m[0]),
            cell(m[1]),
            cell(m[2]),
            m[0] / m[2].max(1e-9),
            m[0] / m[1].max(1e-9)
        );
    }
}
