//! `torture`: SIGKILL parallaxd while a client writes and flushes, restart it, and check that
//! nothing acknowledged before a completed FLUSH was lost, that no block holds data that was never
//! written, that snapshots never change, and that `vdi check` stays clean.
//!
//! The rule checked for every 4 KiB block `b` after each kill (see docs/reliability.md):
//!
//! * `F` = the sequence number of the last write acknowledged before the last FLUSH that completed
//!   in the round (the driver is synchronous: one request at a time).
//! * `L(b)` = the last write to `b` with sequence `<= F` in this round; if there is none, the
//!   content observed in `b` at the end of the previous round (zeros at the start).
//! * `b` must hold exactly the content of `L(b)` or of a write to `b` issued in this round after
//!   `L(b)` (acknowledged or not). Anything else — an older write, another block's data, a write
//!   never issued, garbage, or a block whose sectors come from different writes — is a failure.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::sys;

/// Flags of `torture`.
#[derive(Debug, Args)]
pub struct TortureArgs {
    /// SIGKILLs of parallaxd (each followed by a restart and a full check).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub kills: u64,
    /// Seed of every random choice (offsets, kill moments, snapshot moments).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Take a snapshot (through the running daemon) every this many kills; 0 = never.
    #[arg(long, default_value_t = 5)]
    pub snap_every: u64,
    /// Run `vdi check` through the daemon every this many kills (and always at the end).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub check_every: u64,
    /// At the end, damage copies of the read-back image three ways and fail unless the checker
    /// reports each.
    #[arg(long)]
    pub self_test: bool,
    /// Stop at the first round with a failure.
    #[arg(long)]
    pub stop_on_failure: bool,
    /// Keep the scratch directory (store, logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

const TASK: &str = "torture";
const VDI: &str = "torture";
const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const DISK: u64 = 64 << 20;
const NBLOCKS: usize = (DISK as usize) / BLOCK;
/// Half of the writes go to this many blocks, so blocks are overwritten often.
const HOT: usize = 256;
const MAGIC: &[u8; 8] = b"PLXTORT1";
const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// The Python client: writes 4 KiB blocks at random offsets, flushes after about one write in
/// five, and prints `I seq blk` before each write, `A seq` after its reply and `F seq` after
/// each FLUSH reply (seq = the last write before the flush), one line at a time, unbuffered.
const DRIVER: &str = r#"
import nbd, os, random, struct, sys
uri, seed, seq, nblocks, hot = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
K1, K2, M = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, (1 << 64) - 1
rng = random.Random(seed)
def block(seq, blk):
    out = []
    for s in range(8):
        pat = struct.pack('<QQ', seq ^ K1, (blk ^ K2 ^ (s * 0x1000193)) & M)
        out.append(b'PLXTORT1' + struct.pack('<QQI', seq, blk, s) + b'\0' * 4 + pat * 30)
    return b''.join(out)
def say(line):
    os.write(1, (line + '\n').encode())
h = nbd.NBD()
h.connect_uri(uri)
say('C')
while True:
    blk = rng.randrange(hot) if rng.random() < 0.5 else rng.randrange(nblocks)
    seq += 1
    data = block(seq, blk)
    say('I %d %d' % (seq, blk))
    h.pwrite(data, blk * 4096)
    say('A %d' % seq)
    if rng.random() < 0.2:
        h.flush()
        say('F %d' % seq)
"#;

/// The expected 512-byte sector `s` of the block written by write `seq` to block `blk`.
pub fn sector_content(seq: u64, blk: u64, s: u32) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&blk.to_le_bytes());
    out[24..28].copy_from_slice(&s.to_le_bytes());
    let mut pat = [0u8; 16];
    pat[..8].copy_from_slice(&(seq ^ K1).to_le_bytes());
    pat[8..].copy_from_slice(&(blk ^ K2 ^ u64::from(s).wrapping_mul(0x100_0193)).to_le_bytes());
    for chunk in out[32..].chunks_mut(16) {
        chunk.copy_from_slice(&pat);
    }
    out
}

/// The 4 KiB block written by write `seq` to block `blk`.
pub fn block_content(seq: u64, blk: u64) -> Vec<u8> {
    (0..(BLOCK / SECTOR) as u32).flat_map(|s| sector_content(seq, blk, s)).collect()
}

/// What one block holds. `Write(0)` means zeros (never written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// All sectors from this write (0 = all zeros).
    Write(u64),
    /// Each sector is a valid sector of this block, but from different writes.
    Torn,
    /// Something that is neither zeros nor a sector the driver writes to this block.
    Garbage,
}

/// Classifies block `blk` of an image.
pub fn classify(data: &[u8], blk: u64) -> Seen {
    let mut first: Option<u64> = None;
    let mut torn = false;
    for (s, sec) in data.chunks(SECTOR).enumerate() {
        let seq = if sec.iter().all(|&b| b == 0) {
            0
        } else {
            if &sec[..8] != MAGIC {
                return Seen::Garbage;
            }
            let seq = u64::from_le_bytes(sec[8..16].try_into().unwrap_or_default());
            if seq == 0 || sec != sector_content(seq, blk, s as u32) {
                return Seen::Garbage;
            }
            seq
        };
        match first {
            None => first = Some(seq),
            Some(f) if f != seq => torn = true,
            _ => {}
        }
    }
    if torn { Seen::Torn } else { Seen::Write(first.unwrap_or(0)) }
}

/// What the driver reported in one round.
#[derive(Debug, Default, Clone)]
pub struct RoundLog {
    /// (seq, blk) of every write issued, in order.
    pub issued: Vec<(u64, u64)>,
    /// Highest seq whose reply arrived.
    pub acked: u64,
    /// Seq of the last write before the last completed FLUSH (0 = no flush completed).
    pub flushed: u64,
    /// The driver connected.
    pub connected: bool,
}

impl RoundLog {
    fn parse_line(&mut self, line: &str) {
        let mut it = line.split_whitespace();
        let tag = it.next();
        let a: Option<u64> = it.next().and_then(|x| x.parse().ok());
        let b: Option<u64> = it.next().and_then(|x| x.parse().ok());
        match (tag, a, b) {
            (Some("C"), _, _) => self.connected = true,
            (Some("I"), Some(seq), Some(blk)) => self.issued.push((seq, blk)),
            (Some("A"), Some(seq), _) => self.acked = seq,
            (Some("F"), Some(seq), _) => self.flushed = seq,
            _ => {} // a line cut by the kill
        }
    }
}

/// Totals of the verification of one round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Blocks whose required content was a write acknowledged before a completed flush in this round.
    pub verified_writes: u64,
    /// Of the writes after the last completed flush, the blocks that show them.
    pub unflushed_landed: u64,
    /// Failures, one line each.
    pub failures: Vec<String>,
}

/// Checks `image` against the rule in the module doc; `baseline[b]` is the write seen in block
/// `b` after the previous round and is updated to what is seen now.
pub fn verify(image: &[u8], log: &RoundLog, baseline: &mut [u64]) -> Verdict {
    let mut v = Verdict::default();
    // Writes of this round per block, in order.
    let mut per_block: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(seq, blk) in &log.issued {
        per_block.entry(blk).or_default().push(seq);
    }
    for (b, data) in image.chunks(BLOCK).enumerate().take(baseline.len()) {
        let blk = b as u64;
        let seen = classify(data, blk);
        let writes = per_block.get(&blk).map(Vec::as_slice).unwrap_or(&[]);
        let durable = writes.iter().copied().filter(|&s| s <= log.flushed).max();
        let required = durable.unwrap_or(baseline[b]);
        let later: Vec<u64> = writes.iter().copied().filter(|&s| s > required).collect();
        match seen {
            Seen::Write(s) if s == required || later.contains(&s) => {
                if durable.is_some() {
                    v.verified_writes += 1;
                }
                if s > log.flushed && s != 0 {
                    v.unflushed_landed += 1;
                }
                baseline[b] = s;
            }
            Seen::Write(s) => {
                let what = if s == 0 {
                    "zeros".to_string()
                } else if s < required {
                    format!("older write {s} (lost data)")
                } else {
                    format!("write {s}, which this round did not issue to this block")
                };
                v.failures.push(format!(
                    "block {b}: holds {what}; expected write {required}{}",
                    if later.is_empty() { String::new() } else { format!(" or one of {later:?}") }
                ));
            }
            Seen::Torn => v.failures.push(format!(
                "block {b}: torn (sectors of different writes); expected write {required} or one of {later:?}"
            )),
            Seen::Garbage => v.failures.push(format!("block {b}: holds data no write produced")),
        }
    }
    v
}

/// Deterministic random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

struct Env {
    parallaxd: PathBuf,
    vdi: PathBuf,
    store: PathBuf,
    run_dir: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl Env {
    fn vdi(&self) -> Command {
        let mut c = Command::new(&self.vdi);
        c.arg("--store").arg(&self.store).env("PARALLAX_RUN_DIR", &self.run_dir);
        c
    }

    fn start_daemon(&self) -> Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("parallaxd.log"))
            .context("cannot open the daemon log")?;
        let err = log.try_clone()?;
        let mut child = Command::new(&self.parallaxd)
            .arg("--store")
            .arg(&self.store)
            .args(["--nbd", &format!("127.0.0.1:{}", self.port)])
            .env("PARALLAX_RUN_DIR", &self.run_dir)
            .env("PARALLAX_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .context("cannot start parallaxd")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                bail!("parallaxd exited at start ({st}): the store did not open; see {}", self.log_path().display());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("parallaxd not listening after 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("parallaxd.log")
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Reads a whole export through NBD with nbdcopy (to a pipe: copying onto an existing file
    /// makes nbdcopy zero it first, which is slow).
    fn dump(&self, export: &str) -> Result<Vec<u8>> {
        let data = sys::run(Command::new("nbdcopy").arg(self.uri(export)).arg("-"))?.stdout;
        if data.len() as u64 != DISK {
            bail!("export {export} read back {} bytes, expected {DISK}", data.len());
        }
        Ok(data)
    }
}

fn kill9(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = child.wait();
}

fn sigterm(child: &mut Child) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("parallaxd exited with {st} on SIGTERM");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            kill9(child);
            bail!("parallaxd still running 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Snap {
    id: String,
    hash: u64,
}

/// Runs the torture test and prints its summary on stdout.
pub fn run(a: &TortureArgs) -> Result<()> {
    sys::require("nbdcopy", "libnbd-bin", TASK)?;
    if !Path::new("/usr/bin/python3").exists() {
        bail!("{TASK} needs /usr/bin/python3 with the nbd module (package python3-libnbd)");
    }
    sys::run(Command::new("/usr/bin/python3").args(["-c", "import nbd"]))
        .context("/usr/bin/python3 cannot import nbd: install python3-libnbd")?;
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], a.no_build)?;
    let tmp = tempfile::Builder::new().prefix("parallax-torture-").tempdir()?;
    let dir = if a.keep { tmp.keep() } else { tmp.path().to_path_buf() };
    let run_dir = dir.join("run");
    std::fs::create_dir(&run_dir)?;
    let driver = dir.join("driver.py");
    std::fs::write(&driver, DRIVER)?;
    let env = Env {
        parallaxd: bins[0].clone(),
        vdi: bins[1].clone(),
        store: dir.join("blockstore.dat"),
        run_dir,
        dir: dir.clone(),
        port: sys::free_port()?,
    };
    sys::run(env.vdi().args(["create", VDI, "--size", "64M"]))?;
    let mut rng = Rng(a.seed ^ 0x5eed);
    let mut baseline = vec![0u64; NBLOCKS];
    let mut snaps: Vec<Snap> = Vec::new();
    let mut seq: u64 = 0;
    let (mut verified, mut issued_total, mut flushes, mut unflushed_landed) = (0u64, 0u64, 0u64, 0u64);
    let mut failures: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut daemon = env.start_daemon()?;
    eprintln!("xtask: {TASK}: store in {}, seed {}, {} kills", dir.display(), a.seed, a.kills);

    for round in 1..=a.kills {
        // The client.
        let mut drv = Command::new("/usr/bin/python3")
            .arg(&driver)
            .arg(env.uri(VDI))
            .arg((a.seed.wrapping_mul(1000) + round).to_string())
            .arg(seq.to_string())
            .arg(NBLOCKS.to_string())
            .arg(HOT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(dir.join("driver.err"))?)
            .spawn()
            .context("cannot start the python driver")?;
        let log = Arc::new(Mutex::new(RoundLog::default()));
        let stdout = drv.stdout.take().context("no driver stdout")?;
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    log.lock().unwrap_or_else(|e| e.into_inner()).parse_line(&line);
                }
            })
        };
        // Wait for the connection, then a random time.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap_or_else(|e| e.into_inner()).connected {
            if let Some(st) = drv.try_wait()? {
                bail!("round {round}: the driver exited before connecting ({st}): {}", driver_err(&dir));
            }
            if Instant::now() > deadline {
                kill9(&mut drv);
                bail!("round {round}: the driver did not connect in 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let take_snap = a.snap_every > 0 && round % a.snap_every == 0;
        if take_snap {
            std::thread::sleep(Duration::from_millis(rng.range(50, 400)));
            let id = sys::run_text(env.vdi().args(["snap", VDI]))
                .with_context(|| format!("round {round}: vdi snap"))?
                .trim()
                .to_string();
            let export = format!("{VDI}@{id}");
            let data = env.dump(&export).with_context(|| format!("round {round}: reading snapshot {id}"))?;
            let bad = garbage_blocks(&data);
            if !bad.is_empty() {
                failures.push(format!("round {round}: snapshot {id} has blocks no write produced: {bad:?}"));
            }
            snaps.push(Snap { id, hash: fnv(&data) });
        }
        std::thread::sleep(Duration::from_millis(rng.range(100, 1200)));
        if let Some(st) = drv.try_wait()? {
            bail!("round {round}: the driver died before the kill ({st}): {}", driver_err(&dir));
        }
        // The crash: the daemon first, so the driver cannot see a reply that the daemon then loses.
        kill9(&mut daemon);
        kill9(&mut drv);
        let _ = reader.join();
        let log = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(&(last, _)) = log.issued.last() {
            seq = last;
        }
        issued_total += log.issued.len() as u64;
        if log.flushed > 0 {
            flushes += 1;
        }

        // Restart and verify.
        let t_restart = Instant::now();
        daemon = env.start_daemon().with_context(|| format!("round {round}: restart after SIGKILL"))?;
        let restart_ms = t_restart.elapsed().as_millis();
        let t_read = Instant::now();
        let image = env.dump(VDI).with_context(|| format!("round {round}: reading the VDI back"))?;
        let read_ms = t_read.elapsed().as_millis();
        let v = verify(&image, &log, &mut baseline);
        verified += v.verified_writes;
        unflushed_landed += v.unflushed_landed;
        for f in &v.failures {
            failures.push(format!("round {round}: {f}"));
        }
        // The newest snapshot and one older one in rotation; all of them at the end.
        let mut check: Vec<usize> = Vec::new();
        if !snaps.is_empty() {
            check.push(snaps.len() - 1);
            check.push(round as usize % snaps.len());
        }
        if round == a.kills {
            check = (0..snaps.len()).collect();
        }
        check.dedup();
        for i in check {
            let s = &snaps[i];
            let data = env.dump(&format!("{VDI}@{}", s.id))?;
            if fnv(&data) != s.hash {
                failures.push(format!("round {round}: snapshot {} changed after a kill", s.id));
            }
        }
        if (round % a.check_every == 0 || round == a.kills)
            && let Err(e) = sys::run(env.vdi().arg("check"))
        {
            failures.push(format!("round {round}: vdi check (through the daemon) failed: {e:#}"));
        }
        eprintln!(
            "xtask: {TASK}: kill {round}/{}: restart {restart_ms} ms, read-back {read_ms} ms, {} writes issued, acked to {}, flushed to {}, {} durable blocks verified{}",
            a.kills,
            log.issued.len(),
            log.acked,
            log.flushed,
            v.verified_writes,
            if v.failures.is_empty() { String::new() } else { format!(", {} FAILURES", v.failures.len()) }
        );
        if !v.failures.is_empty() && a.stop_on_failure {
            break;
        }
    }

    if a.self_test {
        self_test_on_image(&env, &baseline)?;
    }
    sigterm(&mut daemon).context("stopping parallaxd at the end")?;
    if let Err(e) = sys::run(env.vdi().arg("check")) {
        failures.push(format!("final offline vdi check failed: {e:#}"));
    }

    println!("## torture (seed {}, {:.0} s)\n", a.seed, started.elapsed().as_secs_f64());
    println!("| figure | value |\n|---|---:|");
    println!("| SIGKILLs of parallaxd survived | {} |", a.kills);
    println!("| writes issued | {issued_total} |");
    println!("| rounds with a completed flush | {flushes} |");
    println!("| durable blocks verified (acked before a completed flush) | {verified} |");
    println!("| blocks showing a write issued after the last flush | {unflushed_landed} |");
    println!("| snapshots taken and re-read after later kills | {} |", snaps.len());
    println!("| failures (loss, garbage, torn, changed snapshot, check) | {} |", failures.len());
    if !failures.is_empty() {
        for f in failures.iter().take(50) {
            eprintln!("xtask: {TASK}: FAILURE: {f}");
        }
        bail!("{} failures; the store is in {} (run with --keep to keep it)", failures.len(), dir.display());
    }
    Ok(())
}

/// Blocks of an image that are neither zeros nor one whole write to that block.
fn garbage_blocks(image: &[u8]) -> Vec<usize> {
    image
        .chunks(BLOCK)
        .enumerate()
        .filter(|(b, d)| !matches!(classify(d, *b as u64), Seen::Write(_)))
        .map(|(b, _)| b)
        .take(20)
        .collect()
}

/// Shows the checker catches damage: takes the last verified image, damages it three ways and
/// expects a failure for each.
fn self_test_on_image(env: &Env, baseline: &[u64]) -> Result<()> {
    let image = env.dump(VDI)?;
    let quiet = RoundLog::default();
    let mut base = baseline.to_vec();
    let clean = verify(&image, &quiet, &mut base);
    if !clean.failures.is_empty() {
        bail!("self-test: the untouched image fails: {:?}", &clean.failures[..clean.failures.len().min(5)]);
    }
    let Some(b) = baseline.iter().position(|&s| s != 0) else { bail!("self-test: nothing was written") };
    type Damage<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
    let cases: [(&str, Damage<'_>); 3] = [
        ("one byte flipped", Box::new(move |img: &mut Vec<u8>| img[b * BLOCK + 100] ^= 1)),
        ("block zeroed (lost write)", Box::new(move |img: &mut Vec<u8>| img[b * BLOCK..(b + 1) * BLOCK].fill(0))),
        (
            "another block's data",
            Box::new(move |img: &mut Vec<u8>| {
                let other = block_content(baseline[b], b as u64 + 1);
                img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&other);
            }),
        ),
    ];
    for (what, damage) in cases {
        let mut img = image.clone();
        damage(&mut img);
        let mut base = baseline.to_vec();
        let v = verify(&img, &quiet, &mut base);
        if v.failures.is_empty() {
            bail!("self-test: the checker missed damage '{what}' to block {b}");
        }
        eprintln!("xtask: {TASK}: self-test: '{what}' in block {b} detected: {}", v.failures[0]);
    }
    println!("self-test: the checker detected all 3 kinds of damage to block {b}");
    Ok(())
}

fn driver_err(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("driver.err")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: &[(usize, u64)], n: usize) -> Vec<u8> {
        let mut img = vec![0u8; n * BLOCK];
        for &(b, seq) in blocks {
            img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&block_content(seq, b as u64));
        }
        img
    }

    fn log(issued: &[(u64, u64)], flushed: u64) -> RoundLog {
        RoundLog { issued: issued.to_vec(), acked: issued.last().map_or(0, |x| x.0), flushed, connected: true }
    }

    #[test]
    fn classify_blocks() {
        let img = image(&[(1, 7)], 3);
        assert_eq!(classify(&img[..BLOCK], 0), Seen::Write(0));
        assert_eq!(classify(&img[BLOCK..2 * BLOCK], 1), Seen::Write(7));
        // Block 1's data in block 2's place is not valid.
        assert_eq!(classify(&img[BLOCK..2 * BLOCK], 2), Seen::Garbage);
        let mut torn = block_content(7, 1);
        torn[SECTOR..2 * SECTOR].copy_from_slice(&sector_content(9, 1, 1));
        assert_eq!(classify(&torn, 1), Seen::Torn);
        let mut flipped = block_content(7, 1);
        flipped[4000] ^= 0x80;
        assert_eq!(classify(&flipped, 1), Seen::Garbage);
    }

    #[test]
    fn rule() {
        // Writes 1 (blk 0), 2 (blk 0), 3 (blk 1), flush after 2; write 4 (blk 0) not flushed.
        let l = log(&[(1, 0), (2, 0), (3, 1), (4, 0)], 2);
        let ok = |img: &[u8]| {
            let mut base = vec![0u64; 2];
            verify(img, &l, &mut base).failures
        };
        assert!(ok(&image(&[(0, 2)], 2)).is_empty()); // flushed write, 3 not landed
        assert!(ok(&image(&[(0, 4), (1, 3)], 2)).is_empty()); // later writes landed
        assert_eq!(ok(&image(&[(0, 1)], 2)).len(), 1); // older write: loss
        assert_eq!(ok(&image(&[], 2)).len(), 1); // flushed write lost entirely
        assert_eq!(ok(&image(&[(0, 2), (1, 99)], 2)).len(), 1); // never issued
        // Baseline: a block untouched in the round must keep what it held.
        let quiet = log(&[], 0);
        let mut base = vec![5u64, 0];
        assert!(verify(&image(&[(0, 5)], 2), &quiet, &mut base).failures.is_empty());
        let mut base = vec![5u64, 0];
        assert_eq!(verify(&image(&[], 2), &quiet, &mut base).failures.len(), 1);
    }
}
