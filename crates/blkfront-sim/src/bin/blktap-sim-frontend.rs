//! A simulated guest (`blkfront`) in its own process: attaches to a backend's ring socket,
//! then either runs a verified random workload or a benchmark.
//!
//! ```text
//! blktap-sim-frontend --socket PATH --vdi NAME [--guest N] [--seed S] [--ops N] [--depth D]
//!                     [--ring-order K] [--abi x86_64|x86_32] [--no-final-check]
//! blktap-sim-frontend --socket PATH --vdi NAME --bench randread|randwrite|seqread|seqwrite
//!                     [--bs BYTES] [--depth D] [--seconds S]
//! blktap-sim-frontend --socket PATH --vdi NAME --crash-state FILE --round R [--guest N] ...
//! ```
//!
//! Crash mode (for `cargo xtask ring-torture`): first reads the whole disk and checks every
//! sector against FILE, the crash model the previous round left (absent: the golden image) —
//! each must hold what the last completed flush made durable or something written after it —
//! then runs the random mix until the backend goes away (or `--ops` are done), and saves the
//! new crash model to FILE. Flushes and barriers wait for the requests in flight, so when one
//! completes, everything completed before it is durable.
//!
//! Verify mode expects the disk to start as the golden image of `blkfront_sim::workload` and checks
//! every read against its model of what this guest wrote; at the end it reads the whole disk
//! back. It prints one JSON line (counts and the model's digest) and exits 0, or prints what
//! went wrong (naming any other guest's data it saw) and exits 1.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blkfront_sim::guest::{Completion, Guest, GuestOp};
use blkfront_sim::workload::{CrashModel, Expect, Model};
use blkfront_sim::{FrontendOptions, SimFrontend};
use blktap::abi::{Abi, RSP_OKAY, SECTOR_SIZE};
use blktap::sim::parse_protocol;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    socket: PathBuf,
    vdi: String,
    guest: u32,
    seed: u64,
    ops: u64,
    depth: usize,
    ring_order: u32,
    abi: Abi,
    final_check: bool,
    bench: Option<String>,
    bs: usize,
    seconds: f64,
    crash_state: Option<PathBuf>,
    round: u64,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        socket: PathBuf::new(),
        vdi: String::new(),
        guest: 0,
        seed: 1,
        ops: 2000,
        depth: 32,
        ring_order: 0,
        abi: Abi::X86_64,
        final_check: true,
        bench: None,
        bs: 4096,
        seconds: 5.0,
        crash_state: None,
        round: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-final-check" {
            a.final_check = false;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--socket" => a.socket = value.into(),
            "--vdi" => a.vdi = value,
            "--guest" => a.guest = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--ops" => a.ops = value.parse()?,
            "--depth" => a.depth = value.parse()?,
            "--ring-order" => a.ring_order = value.parse()?,
            "--abi" => a.abi = parse_protocol(&format!("{value}-abi")).ok_or("--abi is x86_64 or x86_32")?,
            "--bench" => a.bench = Some(value),
            "--bs" => a.bs = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--crash-state" => a.crash_state = Some(value.into()),
            "--round" => a.round = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if a.socket.as_os_str().is_empty() || a.vdi.is_empty() {
        return Err("usage: blktap-sim-frontend --socket PATH --vdi NAME [options]".into());
    }
    if a.depth == 0 || a.bs == 0 || !a.bs.is_multiple_of(SECTOR_SIZE) {
        return Err("--depth must be positive and --bs a positive multiple of 512".into());
    }
    Ok(a)
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn connect(a: &Args) -> Res<Guest> {
    let data_pages = (a.depth as u32 + 1) * 260;
    let opts = FrontendOptions { vdi: a.vdi.clone(), ring_page_order: a.ring_order, data_pages, protocol: a.abi };
    let front = SimFrontend::connect(&a.socket, &opts)?;
    Ok(Guest::new(front))
}

#[derive(Default)]
struct Counts {
    reads: u64,
    writes: u64,
    barriers: u64,
    flushes: u64,
    discards: u64,
    bytes: u64,
}

/// What a request in flight covers, and the version a write carries.
struct InFlight {
    start: u64,
    end: u64,
    version: u64,
}

fn overlaps(busy: &HashMap<u64, InFlight>, start: u64, end: u64) -> bool {
    busy.values().any(|f| f.start < end && start < f.end)
}

fn verify(a: &Args) -> Res<()> {
    let mut guest = connect(a)?;
    if guest.read_only() {
        return Err("the disk is read-only; verify mode writes".into());
    }
    let mut model = Model::new(a.guest, guest.sectors());
    let mut counts = Counts::default();
    let issued = run_mix(a, &mut guest, &mut model, &mut counts, 0, None)?;
    let c = guest.run(GuestOp::Flush, TIMEOUT)?;
    if c.status != RSP_OKAY {
        return Err(format!("final flush failed with status {}", c.status).into());
    }
    if a.final_check {
        full_read_check(&mut guest, &model)?;
    }
    println!(
        "{{\"guest\":{},\"ops\":{},\"reads\":{},\"writes\":{},\"barriers\":{},\"flushes\":{},\"discards\":{},\"bytes\":{},\"digest\":\"{:016x}\"}}",
        a.guest,
        issued,
        counts.reads,
        counts.writes,
        counts.barriers,
        counts.flushes,
        counts.discards,
        counts.bytes,
        model.digest()
    );
    Ok(())
}

/// Runs `a.ops` requests of the random mix with `a.depth` in flight, checking every read
/// against `model` and keeping it up to date. Versions start above `version_base`. With a
/// crash model, every write is recorded when submitted, and flushes and barriers are issued
/// alone so their completion makes the whole model durable. Returns the requests issued.
fn run_mix(
    a: &Args,
    guest: &mut Guest,
    model: &mut Model,
    counts: &mut Counts,
    version_base: u64,
    mut crash: Option<&mut CrashModel>,
) -> Result<u64, blktap::Error> {
    let sectors = guest.sectors();
    let mut rng = Rng(a.seed ^ (u64::from(a.guest) << 32));
    let mut busy: HashMap<u64, InFlight> = HashMap::new();
    let (mut issued, mut version) = (0u64, version_base);
    let small = 64u64.min(sectors);
    let large = u64::from(guest.max_sectors()).min(sectors);
    // A flush or barrier waiting for the requests in flight (crash mode only).
    let mut ordering_point = false;
    while issued < a.ops || guest.in_flight() > 0 {
        while issued < a.ops && guest.in_flight() < a.depth && !ordering_point {
            let kind = rng.below(100);
            let len = if kind >= 95 { 1 + rng.below(large) } else { 1 + rng.below(small) };
            let start = rng.below(sectors - len + 1);
            let end = start + len;
            let alone = crash.is_some() && ((75..82).contains(&kind) || (90..95).contains(&kind));
            if alone && guest.in_flight() > 0 {
                ordering_point = true;
                break;
            }
            if (75..82).contains(&kind) {
                let op = GuestOp::Flush;
                if !guest.can_submit(&op) {
                    break;
                }
                let id = guest.submit(op)?;
                busy.insert(id, InFlight { start: 0, end: 0, version: 0 });
                issued += 1;
                ordering_point = alone;
                continue;
            }
            if overlaps(&busy, start, end) {
                break;
            }
            version += 1;
            let op = match kind {
                0..40 => GuestOp::Write { sector: start, data: model.write_data(start, len, version), barrier: false },
                40..75 | 95.. => GuestOp::Read { sector: start, sectors: len as u32 },
                82..90 => GuestOp::Discard { sector: start, sectors: len },
                _ => GuestOp::Write { sector: start, data: model.write_data(start, len, version), barrier: true },
            };
            if !guest.can_submit(&op) {
                break;
            }
            if let Some(c) = crash.as_deref_mut() {
                match &op {
                    GuestOp::Write { .. } => c.submitted(start, len, Expect::Written(version)),
                    GuestOp::Discard { .. } => c.submitted(start, len, Expect::Zero),
                    _ => {}
                }
            }
            let id = guest.submit(op)?;
            busy.insert(id, InFlight { start, end, version });
            issued += 1;
            ordering_point = alone;
        }
        for c in guest.complete(TIMEOUT)? {
            let f = busy.remove(&c.id).ok_or_else(|| protocol("completion of an unknown request"))?;
            account(model, counts, &c, &f).map_err(|e| protocol(&e.to_string()))?;
            let durable_point = matches!(c.op, GuestOp::Flush | GuestOp::Write { barrier: true, .. });
            if let Some(cm) = crash.as_deref_mut()
                && durable_point
                && guest.in_flight() == 0
            {
                cm.flushed(model);
            }
        }
        if guest.in_flight() == 0 {
            ordering_point = false;
        }
    }
    Ok(issued)
}

fn protocol(msg: &str) -> blktap::Error {
    blktap::Error::Protocol(msg.to_string())
}

/// Crash mode: settle the disk against the last crash model, then run until the backend dies.
fn crash_round(a: &Args, path: &std::path::Path) -> Res<()> {
    let mut guest = match connect(a) {
        Ok(g) => g,
        // Killed before or while attaching: nothing was written this round.
        Err(e) => return report_killed(a, "attaching", &e.to_string(), 0, 0),
    };
    let sectors = guest.sectors();
    let before = if path.exists() {
        CrashModel::load(path, a.guest, sectors)?
    } else {
        CrashModel::durable(&Model::new(a.guest, sectors))
    };
    let mut model = Model::new(a.guest, sectors);
    match settle(&mut guest, &before, &mut model) {
        Ok(()) => {}
        Err(ReadBack::Gone(e)) => return report_killed(a, "checking the disk", &e, 0, 0),
        Err(ReadBack::Wrong(e)) => return Err(e.into()),
    }
    // What the restarted backend serves is what it committed: all of it is durable now.
    let mut crash = CrashModel::durable(&model);
    let mut counts = Counts::default();
    let base = a.round << 40;
    let result = run_mix(a, &mut guest, &mut model, &mut counts, base, Some(&mut crash));
    crash.save(path)?;
    match result {
        Ok(issued) => {
            println!("{{\"guest\":{},\"killed\":false,\"ops\":{issued},\"flushes\":{}}}", a.guest, counts.flushes);
            Ok(())
        }
        Err(blktap::Error::PeerGone) => report_killed(a, "running", "the backend went away", counts.flushes, 1),
        Err(e) => Err(e.into()),
    }
}

fn report_killed(a: &Args, when: &str, why: &str, flushes: u64, ran: u64) -> Res<()> {
    println!(
        "{{\"guest\":{},\"killed\":true,\"when\":\"{when}\",\"why\":\"{}\",\"flushes\":{flushes},\"ran\":{ran}}}",
        a.guest,
        why.replace(['"', '\\'], "'")
    );
    Ok(())
}

/// Why reading the whole disk back stopped.
enum ReadBack {
    /// The backend went away.
    Gone(String),
    /// A read failed or a sector was wrong.
    Wrong(String),
}

/// Reads the whole disk with many large reads in flight, handing each read's first sector
/// and bytes to `check`.
fn read_whole_disk(guest: &mut Guest, mut check: impl FnMut(u64, &[u8]) -> Result<(), String>) -> Result<(), ReadBack> {
    let chunk = u64::from(guest.max_sectors()).min(1024);
    let total = guest.sectors();
    let mut next = 0u64;
    let failed = |e: blktap::Error| match e {
        blktap::Error::PeerGone => ReadBack::Gone(e.to_string()),
        e => ReadBack::Wrong(e.to_string()),
    };
    while next < total || guest.in_flight() > 0 {
        while next < total {
            let n = chunk.min(total - next);
            let op = GuestOp::Read { sector: next, sectors: n as u32 };
            if !guest.can_submit(&op) {
                break;
            }
            guest.submit(op).map_err(failed)?;
            next += n;
        }
        for c in guest.complete(TIMEOUT).map_err(failed)? {
            let (GuestOp::Read { sector, .. }, Some(data)) = (&c.op, &c.data) else {
                return Err(ReadBack::Wrong(format!("{} failed with status {}", describe(&c.op), c.status)));
            };
            check(*sector, data).map_err(ReadBack::Wrong)?;
        }
    }
    Ok(())
}

/// Reads the whole disk, checks each sector against the crash model and adopts what it holds.
fn settle(guest: &mut Guest, before: &CrashModel, model: &mut Model) -> Result<(), ReadBack> {
    read_whole_disk(guest, |sector, data| {
        for (i, bytes) in data.chunks(SECTOR_SIZE).enumerate() {
            let s = sector + i as u64;
            model.set(s, before.settle(s, bytes)?);
        }
        Ok(())
    })
}

fn account(model: &mut Model, counts: &mut Counts, c: &Completion, f: &InFlight) -> Res<()> {
    if c.status != RSP_OKAY {
        return Err(format!("{:?} failed with status {}", describe(&c.op), c.status).into());
    }
    let len = f.end - f.start;
    match &c.op {
        GuestOp::Read { sector, .. } => {
            counts.reads += 1;
            counts.bytes += len * SECTOR_SIZE as u64;
            model.check(*sector, c.data.as_deref().ok_or("read without data")?)?;
        }
        GuestOp::Write { sector, barrier, .. } => {
            if *barrier {
                counts.barriers += 1;
            } else {
                counts.writes += 1;
            }
            counts.bytes += len * SECTOR_SIZE as u64;
            model.wrote(*sector, len, f.version);
        }
        GuestOp::Discard { sector, sectors } => {
            counts.discards += 1;
            model.discarded(*sector, *sectors);
        }
        GuestOp::Flush => counts.flushes += 1,
    }
    Ok(())
}

fn describe(op: &GuestOp) -> String {
    match op {
        GuestOp::Read { sector, sectors } => format!("read of {sectors} sectors at {sector}"),
        GuestOp::Write { sector, barrier, .. } => {
            format!("{} at {sector}", if *barrier { "barrier write" } else { "write" })
        }
        GuestOp::Flush => "flush".into(),
        GuestOp::Discard { sector, sectors } => format!("discard of {sectors} sectors at {sector}"),
    }
}

/// Reads the whole disk back and checks every sector against the model.
fn full_read_check(guest: &mut Guest, model: &Model) -> Res<()> {
    match read_whole_disk(guest, |sector, data| model.check(sector, data)) {
        Ok(()) => Ok(()),
        Err(ReadBack::Gone(e) | ReadBack::Wrong(e)) => Err(format!("final read-back: {e}").into()),
    }
}

fn bench(a: &Args, kind: &str) -> Res<()> {
    let mut guest = connect(a)?;
    let bs_sectors = (a.bs / SECTOR_SIZE) as u64;
    let total = guest.sectors() / bs_sectors;
    if total == 0 {
        return Err("disk smaller than one block".into());
    }
    let (write, random) = match kind {
        "randread" => (false, true),
        "randwrite" => (true, true),
        "seqread" => (false, false),
        "seqwrite" => (true, false),
        _ => return Err(format!("unknown benchmark {kind}").into()),
    };
    let data = vec![0x5au8; a.bs];
    let mut rng = Rng(a.seed);
    let (mut next, mut done, mut bytes) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    while Instant::now() < deadline || guest.in_flight() > 0 {
        while Instant::now() < deadline && guest.in_flight() < a.depth {
            let block = if random { rng.below(total) } else { next % total };
            next += 1;
            let sector = block * bs_sectors;
            let op = if write {
                GuestOp::Write { sector, data: data.clone(), barrier: false }
            } else {
                GuestOp::Read { sector, sectors: bs_sectors as u32 }
            };
            if !guest.can_submit(&op) {
                break;
            }
            guest.submit(op)?;
        }
        for c in guest.complete(TIMEOUT)? {
            if c.status != RSP_OKAY {
                return Err(format!("{} failed with status {}", describe(&c.op), c.status).into());
            }
            done += 1;
            bytes += a.bs as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"{kind}\",\"bs\":{},\"depth\":{},\"ops\":{done},\"seconds\":{secs:.3},\"iops\":{:.0},\"mib_s\":{:.1}}}",
        a.bs,
        a.depth,
        done as f64 / secs,
        bytes as f64 / secs / (1024.0 * 1024.0)
    );
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|a| match (a.bench.clone(), a.crash_state.clone()) {
        (Some(kind), _) => bench(&a, &kind),
        (None, Some(path)) => crash_round(&a, &path),
        (None, None) => verify(&a),
    });
    if let Err(e) = result {
        eprintln!("blktap-sim-frontend: {e}");
        std::process::exit(1);
    }
}
