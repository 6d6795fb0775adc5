//! `cargo xtask xen-demo [--guests N]`: Parallax serving real Xen guests. Xen 4.17 boots under
//! QEMU (TCG, no KVM) with a Debian 12 dom0 that runs `parallaxd --xen` on a store disk; N PV
//! guests boot with `xl create`, each on its own clone of a golden VDI through the blkif ring, and
//! write, flush, discard and read back; a second boot of each finds its data again and keeps
//! writing while parallaxd is restarted under it (the rings are resumed, not closed). Afterwards
//! the store is checked from the host: each clone holds its own marker and no other, the golden
//! snapshot is unchanged, `vdi check` passes. See docs/xen.md.
//!
//! The Debian parts (Xen, the kernel, a debootstrap'd dom0 root with xen-utils) are built once
//! into a cache (`$PARALLAX_XEN_CACHE`, default /var/cache/parallax/xen-demo) and reused.

mod image;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::sys;
use crate::vm_demo::{self, Vdi, setup};

/// Size of the ext4 file system at the start of the golden VDI.
const FS_MIB: u64 = 64;
/// Size of the golden VDI: the file system, then a scratch area the guests write and discard.
const VDI_MIB: u64 = 80;
/// Numbered 4 KiB blocks each guest writes while parallaxd restarts, from `FS_MIB + 8` MiB on.
pub const WRITES: u64 = 150;
/// vCPUs of the `k`th guest (from 0): the first has two, so its blkfront asks for two queues
/// (multi-queue) and the restart resumes both rings; the others have one (the flat layout).
pub fn guest_vcpus(k: usize) -> u32 {
    if k == 0 { 2 } else { 1 }
}

/// One run of the bench guest (`--compare-blkback`): a two-vCPU guest alone, measuring `dd`.
#[derive(Debug, Clone, Copy)]
pub struct BenchRun {
    /// Its name in the logs and of its `xl` configuration (`bench-TAG.cfg`).
    pub tag: &'static str,
    /// On parallaxd (its own clone, VDI `bench-TAG`), or on the kernel's blkback (raw disk).
    pub parallax: bool,
    /// blkfront capped at this many queues (`max_queues`), or one per vCPU.
    pub queues: Option<u32>,
    /// Two `dd`s at once (each on half the range, so blk-mq can use both queues), or one.
    pub parallel: bool,
}

/// The bench runs, in the order dom0 runs them: parallaxd first (then it stops and blkback
/// is loaded).
pub const BENCH_RUNS: [BenchRun; 6] = [
    BenchRun { tag: "parallax", parallax: true, queues: None, parallel: false },
    BenchRun { tag: "parallax-1q", parallax: true, queues: Some(1), parallel: false },
    BenchRun { tag: "parallax-par", parallax: true, queues: None, parallel: true },
    BenchRun { tag: "parallax-1q-par", parallax: true, queues: Some(1), parallel: true },
    BenchRun { tag: "blkback", parallax: false, queues: None, parallel: false },
    BenchRun { tag: "blkback-par", parallax: false, queues: None, parallel: true },
];

/// Size of the store's block device.
const STORE_BYTES: u64 = 1 << 30;

/// Flags of `xen-demo`.
#[derive(Debug, Args)]
pub struct XenDemoArgs {
    /// Number of PV guests, each on its own clone of the golden VDI, booted at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub guests: u32,
    /// Seconds the whole run (Xen boot, both rounds of guests, shutdown) may take.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
    /// Keep the scratch directory (store, images, the serial log) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Also boot one guest alone on parallaxd and then on the kernel's blkback (serving a raw
    /// copy of the golden image from the same kind of disk), and report dd throughput as ratios.
    #[arg(long)]
    pub compare_blkback: bool,
    /// Use the binaries already in target/release (built with `--features daemon/xen`).
    #[arg(long)]
    pub no_build: bool,
    /// Do not install missing packages with apt; fail instead.
    #[arg(long)]
    pub no_install: bool,
}

/// Runs the demo.
pub fn run(args: &XenDemoArgs) -> Result<()> {
    setup::ensure_packages(args.no_install)?;
    let bins = release_binaries_with_xen(args.no_build)?;
    let dir = tempfile::Builder::new().prefix("parallax-xen-demo-").tempdir().context("cannot create a temp dir")?;
    let result = run_in(args, &bins.0, &bins.1, dir.path());
    if args.keep || result.is_err() {
        eprintln!("xen-demo: kept {}", dir.keep().display());
    }
    result
}

/// `cargo build --release -p daemon -p cli --features daemon/xen`: parallaxd with the Xen backend.
fn release_binaries_with_xen(skip: bool) -> Result<(PathBuf, PathBuf)> {
    if !skip {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("xen-demo: building parallaxd (--features daemon/xen) and vdi, release ...");
        let st = Command::new(cargo)
            .current_dir(sys::workspace_root())
            .args(["build", "--release", "--quiet", "-p", "daemon", "-p", "cli", "--features", "daemon/xen"])
            .status()
            .context("cannot run cargo")?;
        if !st.success() {
            bail!("`cargo build --release --features daemon/xen` failed ({st})");
        }
    }
    let dir = sys::release_dir();
    let (d, v) = (dir.join("parallaxd"), dir.join("vdi"));
    let help = sys::run_text(Command::new(&d).arg("--help"))?;
    if !help.contains("--xen") {
        bail!("{} has no --xen: build it with `cargo build --release --features daemon/xen`", d.display());
    }
    Ok((d, v))
}

/// What the run produced, parsed from the serial console.
#[derive(Debug, Default)]
struct Report {
    lines: Vec<String>,
    dom0_ready: Option<f64>,
    done: Option<String>,
}

fn run_in(args: &XenDemoArgs, parallaxd: &Path, vdi_bin: &Path, work: &Path) -> Result<()> {
    let cache = image::cache_dir();
    let base = image::Base::ensure(&cache)?;
    let dom0 = image::dom0_image(&base)?;
    let names: Vec<String> = (1..=args.guests).map(|k| format!("vm-{k}")).collect();

    // The golden image: ext4 in the first FS_MIB MiB, the scratch area after it.
    let golden = vm_demo::image::build_rootfs(work, FS_MIB << 20, vm_demo::image::ROOT_INIT)?;
    std::fs::File::options()
        .write(true)
        .open(&golden)
        .and_then(|f| f.set_len(VDI_MIB << 20))
        .context("cannot extend the golden image")?;
    let store = work.join("store.img");
    std::fs::File::create(&store).and_then(|f| f.set_len(STORE_BYTES)).context("cannot create store.img")?;
    let run_dir = work.join("run");
    std::fs::create_dir_all(&run_dir).context("cannot create the run dir")?;
    let snap = {
        let loopdev = Loop::attach(&store)?;
        let vdi = Vdi { bin: vdi_bin.to_path_buf(), store: loopdev.dev.clone(), run_dir: run_dir.clone() };
        let golden_id = vdi.text(&["create", "golden", "--size", &format!("{VDI_MIB}M")])?;
        vdi.text(&["fill", &golden_id, &golden.to_string_lossy()])?;
        let snap = vdi.text(&["snap", &golden_id])?;
        for name in &names {
            vdi.text(&["create", name, "--from", &snap])?;
        }
        if args.compare_blkback {
            // Each parallaxd run on a clone of its own: none finds blocks an earlier run
            // already copied on write.
            for run in BENCH_RUNS.iter().filter(|r| r.parallax) {
                vdi.text(&["create", &format!("bench-{}", run.tag), "--from", &snap])?;
            }
        }
        eprintln!("xen-demo: store: golden (id {golden_id}) filled, snapshot {snap}, clones {}", names.join(" "));
        snap
    };

    // For the comparison: blkback serves a raw copy of the golden image from a fourth disk.
    let raw = args.compare_blkback.then(|| work.join("bench-raw.img"));
    if let Some(raw) = &raw {
        sys::run(Command::new("cp").arg("--sparse=always").arg(&golden).arg(raw))?;
    }
    let demo_disk = image::demo_disk(work, &base, parallaxd, &names, FS_MIB, args.compare_blkback)?;
    let serial_log = work.join("serial.log");
    eprintln!("xen-demo: booting Xen under QEMU (TCG); serial console in {}", serial_log.display());
    let started = Instant::now();
    let disks = Disks { dom0: &dom0, store: &store, demo: &demo_disk, raw: raw.as_deref() };
    let report = boot(&base, &disks, &serial_log, Duration::from_secs(args.timeout))?;
    let wall = started.elapsed();

    let mut failures = Vec::new();
    check_console(&report, &names, &mut failures);
    let loopdev = Loop::attach(&store)?;
    let vdi = Vdi { bin: vdi_bin.to_path_buf(), store: loopdev.dev.clone(), run_dir };
    check_store(&vdi, work, &golden, &snap, &names, &mut failures)?;
    drop(loopdev);
    print_figures(&report, &names, wall);
    if args.compare_blkback {
        compare_blkback(&report, &mut failures);
    }
    if !failures.is_empty() {
        bail!("{} check(s) failed:\n  {}", failures.len(), failures.join("\n  "));
    }
    eprintln!("xen-demo: all checks passed");
    Ok(())
}

/// dom0's virtio disks, in order: vda, vdb, vdc and (for the comparison) vdd.
struct Disks<'a> {
    /// The root.
    dom0: &'a Path,
    /// The store, served by parallaxd --xen.
    store: &'a Path,
    /// The demo disk (parallaxd, the guests' kernel and configurations, the script).
    demo: &'a Path,
    /// A raw copy of the golden image, served by blkback for the comparison.
    raw: Option<&'a Path>,
}

/// Boots Xen, echoing the demo's lines, until QEMU exits (dom0 powers off) or `timeout`.
fn boot(base: &image::Base, disks: &Disks, log: &Path, timeout: Duration) -> Result<Report> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=tcg", "-cpu", "qemu64,+svm", "-m", "3G", "-smp", "2"]);
    cmd.args(["-nographic", "-monitor", "none", "-serial", "stdio", "-no-reboot"]);
    cmd.arg("-kernel").arg(&base.xen);
    // No `noreboot`: if dom0 ever crashes, Xen reboots, and -no-reboot makes QEMU exit at
    // once instead of the run waiting for its timeout.
    cmd.args(["-append", "dom0_mem=1G,max:1G console=com1 com1=115200,8n1 loglvl=info guest_loglvl=info"]);
    cmd.arg("-initrd").arg(format!(
        "{} console=hvc0 earlyprintk=xen root=/dev/vda rw init={},{}",
        base.vmlinuz.display(),
        image::DOM0_INIT,
        base.initrd.display()
    ));
    let drives = [
        (Some(disks.dom0), ""),
        (Some(disks.store), ",discard=unmap,cache=unsafe"),
        (Some(disks.demo), ""),
        (disks.raw, ",cache=unsafe"),
    ];
    for (file, extra) in drives.iter().filter_map(|(f, e)| f.map(|f| (f, e))) {
        cmd.args(["-drive", &format!("file={},if=virtio,format=raw{extra}", file.display())]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu has no stdout")?;
    let mut file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::Write;
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            let _ = writeln!(file, "{text}");
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut report = Report::default();
    let t0 = Instant::now();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(rest) = line.find("XEN-DEMO: ").map(|i| &line[i + 10..]) {
                    if !rest.starts_with("parallaxd-") {
                        eprintln!("xen-demo: [{:6.1} s] {rest}", t0.elapsed().as_secs_f64());
                    }
                    if let Some(t) = rest.strip_prefix("dom0 ready at ") {
                        report.dom0_ready = t.split_whitespace().next().and_then(|v| v.parse().ok());
                    }
                    if let Some(r) = rest.strip_prefix("DONE ") {
                        report.done = Some(r.trim().to_string());
                    }
                    report.lines.push(rest.to_string());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                bail!("the Xen run did not finish in {} s; serial console in {}", timeout.as_secs(), log.display());
            }
        }
    }
    let st = child.wait().context("cannot wait for qemu")?;
    let _ = reader.join();
    if report.done.is_none() {
        bail!("QEMU exited ({st}) before the demo finished; serial console in {}", log.display());
    }
    Ok(report)
}

/// Every guest, in both rounds: its checks printed no FAIL, it ended with the round's word and
/// DONE, and `xl create -F` exited 0. The dom0 script finished `ok`.
fn check_console(report: &Report, names: &[String], failures: &mut Vec<String>) {
    if report.done.as_deref() != Some("ok") {
        failures.push(format!("dom0's demo script ended with {:?}", report.done));
    }
    for round in [1, 2] {
        let word = if round == 1 { "MARKER-WRITTEN" } else { "MARKER-FOUND" };
        for name in names {
            let prefix = format!("console {name} round {round}: ");
            let console: Vec<&str> =
                report.lines.iter().filter_map(|l| l.strip_prefix(&prefix)).map(str::trim_end).collect();
            let guest = format!("XEN-GUEST {name}: ");
            let said: Vec<&str> =
                console.iter().filter_map(|l| l.find(&guest).map(|i| &l[i + guest.len()..])).collect();
            for fail in said.iter().filter(|s| s.starts_with("FAIL")) {
                failures.push(format!("{name} round {round}: {fail}"));
            }
            let queues = guest_vcpus(names.iter().position(|n| n == name).unwrap_or(usize::MAX));
            let expected = format!("QUEUES {queues} on {queues} vCPU(s)");
            if !said.contains(&expected.as_str()) {
                let got: Vec<&&str> = said.iter().filter(|s| s.starts_with("QUEUES")).collect();
                failures.push(format!("{name} round {round}: blkfront should say `{expected}`, said {got:?}"));
            }
            if round == 2 && !said.iter().any(|s| s.starts_with("WRITER wrote")) {
                failures.push(format!("{name}: no result from the writes across the parallaxd restart"));
            }
            if !said.contains(&word) || !said.contains(&"DONE") {
                let tail = console[console.len().saturating_sub(20)..].join("\n    ");
                failures.push(format!("{name} round {round}: no `{word}` and `DONE`; console tail:\n    {tail}"));
            }
            let xl = format!("{name} round {round}: xl create -F exited ");
            match report.lines.iter().find_map(|l| l.strip_prefix(&xl)) {
                Some(rest) if rest.starts_with("0 ") => {}
                other => failures.push(format!("{name} round {round}: xl create -F: {other:?}")),
            }
        }
    }
    let exits: Vec<&String> = report.lines.iter().filter(|l| l.starts_with("parallaxd exited with ")).collect();
    if exits.len() != 2 || exits.iter().any(|l| *l != "parallaxd exited with 0") {
        failures.push(format!("parallaxd in dom0 should have exited 0 twice on SIGTERM: {exits:?}"));
    }
    for (k, name) in names.iter().enumerate() {
        let prefix = format!("parallaxd resumed the ring of {name}: ");
        match report.lines.iter().find_map(|l| l.strip_prefix(&prefix)) {
            None => failures.push(format!("{name}: the restarted parallaxd did not resume its ring")),
            Some(how) => {
                let queues = guest_vcpus(k);
                if queues > 1 && !how.contains(&format!("({queues} queues)")) {
                    failures.push(format!("{name}: all {queues} of its rings should have been resumed: {how}"));
                }
            }
        }
    }
}

/// From the host, on the store the run left: `vdi check`, each clone's own marker and no other,
/// the golden snapshot unchanged.
fn check_store(
    vdi: &Vdi,
    work: &Path,
    golden: &Path,
    snap: &str,
    names: &[String],
    failures: &mut Vec<String>,
) -> Result<()> {
    let check = vdi.cmd(&["check"]).output().context("cannot run vdi check")?;
    if check.status.success() {
        eprintln!("xen-demo: ok: vdi check passed");
    } else {
        failures.push(format!("vdi check failed: {}", String::from_utf8_lossy(&check.stdout).trim()));
    }
    for name in names {
        let file = work.join(format!("{name}.img"));
        vdi.text(&["export", name, &file.to_string_lossy()])?;
        check_numbered_blocks(&file, name, failures)?;
        let markers = vm_demo::list_markers(&file)?;
        if markers != [format!("marker-{name}")] {
            failures.push(format!("{name}: its clone holds markers {markers:?}, expected only marker-{name}"));
        } else {
            eprintln!("xen-demo: ok: {name}: its clone holds /marker-{name} and no other marker");
        }
        std::fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))?;
    }
    let snap = format!("@{snap}");
    let st = vdi.cmd(&["validate", &snap, &golden.to_string_lossy()]).output().context("cannot run vdi validate")?;
    if st.status.success() {
        eprintln!("xen-demo: ok: snapshot {snap} still equals the golden image");
    } else {
        failures.push(format!("snapshot {snap} no longer matches the golden image"));
    }
    Ok(())
}

/// The blocks the guest wrote across the parallaxd restart, read from its clone on the host:
/// block `i` starts with `NAME-0000i` and a newline, the rest zeros.
fn check_numbered_blocks(export: &Path, name: &str, failures: &mut Vec<String>) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(export).with_context(|| format!("cannot open {}", export.display()))?;
    let first = (FS_MIB + 8) << 20;
    let mut bad = Vec::new();
    let mut block = vec![0u8; 4096];
    for i in 0..WRITES {
        file.read_exact_at(&mut block, first + i * 4096)
            .with_context(|| format!("cannot read {}", export.display()))?;
        let mut want = format!("{name}-{i:05}\n").into_bytes();
        want.resize(4096, 0);
        if block != want {
            bad.push(i);
        }
    }
    if bad.is_empty() {
        eprintln!("xen-demo: ok: {name}: all {WRITES} blocks written across the parallaxd restart are in its clone");
    } else {
        failures
            .push(format!("{name}: {} of {WRITES} blocks written across the restart are wrong: {bad:?}", bad.len()));
    }
    Ok(())
}

/// The figures: dom0 ready, each guest's run time, dd over the ring.
fn print_figures(report: &Report, names: &[String], wall: Duration) {
    eprintln!("xen-demo: figures (QEMU TCG, {} guest(s)):", names.len());
    eprintln!(
        "  whole run {:.0} s; dom0 ready {:.1} s after its kernel started",
        wall.as_secs_f64(),
        report.dom0_ready.unwrap_or(f64::NAN)
    );
    if let Some(t) = report.lines.iter().find_map(|l| l.strip_prefix("parallaxd restarted in ")) {
        eprintln!("  parallaxd stopped and started again under the writing guests in {t}");
    }
    for l in report.lines.iter().filter(|l| l.starts_with("parallaxd resumed the ring of ")) {
        eprintln!("  {l}");
    }
    for name in names {
        for round in [1, 2] {
            let xl = format!("{name} round {round}: xl create -F exited 0 after ");
            if let Some(t) = report.lines.iter().find_map(|l| l.strip_prefix(&xl)) {
                eprintln!("  {name} round {round}: created, ran and powered off in {t}");
            }
        }
        let dd = format!("XEN-GUEST {name}: DD ");
        if let Some(l) = report.lines.iter().find_map(|l| l.find(&dd).map(|i| &l[i + dd.len()..])) {
            eprintln!("  {name}: dd over the ring: {l}");
        }
    }
}

/// `(read MiB, read s, write MiB, write s)` from a guest's `DD read A MiB in B s, write C MiB in D s`.
fn parse_dd(line: &str) -> Option<(f64, f64, f64, f64)> {
    let w: Vec<&str> = line.split(|c: char| c.is_whitespace() || c == ',').filter(|w| !w.is_empty()).collect();
    // DD read A MiB in B s write C MiB in D s
    match w.as_slice() {
        ["DD", "read", a, "MiB", "in", b, "s", "write", c, "MiB", "in", d, "s"] => {
            Some((a.parse().ok()?, b.parse().ok()?, c.parse().ok()?, d.parse().ok()?))
        }
        _ => None,
    }
}

/// The bench guest's dd on parallaxd and on blkback, and their ratios (parallaxd / blkback
/// throughput).
fn compare_blkback(report: &Report, failures: &mut Vec<String>) {
    let dd = |tag: &str| {
        let prefix = format!("console bench-{tag}: ");
        report
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .find_map(|l| l.find("XEN-GUEST bench: ").and_then(|i| parse_dd(&l[i + 17..])))
    };
    let queues = |tag: &str| {
        let prefix = format!("console bench-{tag}: ");
        report
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .find_map(|l| l.find("XEN-GUEST bench: QUEUES ").map(|i| l[i + 24..].trim_end().to_string()))
    };
    for run in BENCH_RUNS.iter().filter(|r| r.parallax) {
        let want = format!("{} on 2 vCPU(s)", run.queues.unwrap_or(2));
        if queues(run.tag).as_deref() != Some(want.as_str()) {
            failures.push(format!("bench-{}: blkfront should use {want}, said {:?}", run.tag, queues(run.tag)));
        }
    }
    let mbs = |mib: f64, s: f64| mib / s.max(1e-3);
    let kq = queues("blkback").unwrap_or_else(|| "?".into());
    eprintln!("xen-demo: one 2-vCPU guest alone, dd over the ring (MiB/s; `2 dd` = two at once, each on half):");
    eprintln!(
        "  | | parallaxd, 2 queues | parallaxd, 1 queue | kernel blkback (raw disk, {kq}) | 2 queues / blkback | 2 queues / 1 queue |"
    );
    eprintln!("  |---|--:|--:|--:|--:|--:|");
    for (suffix, what) in [("", "1 dd"), ("-par", "2 dd")] {
        let two = dd(&format!("parallax{suffix}"));
        let one = dd(&format!("parallax-1q{suffix}"));
        let blkback = dd(&format!("blkback{suffix}"));
        let (Some(p), Some(o), Some(k)) = (two, one, blkback) else {
            failures.push(format!(
                "the {what} comparison has no dd figures (parallaxd {two:?}, parallaxd 1 queue {one:?}, blkback {blkback:?})"
            ));
            continue;
        };
        let (pr, pw, or, ow, kr, kw) =
            (mbs(p.0, p.1), mbs(p.2, p.3), mbs(o.0, o.1), mbs(o.2, o.3), mbs(k.0, k.1), mbs(k.2, k.3));
        eprintln!(
            "  | {what}: read {:.0} MiB | {pr:.1} | {or:.1} | {kr:.1} | {:.2}x | {:.2}x |",
            p.0,
            pr / kr,
            pr / or
        );
        eprintln!(
            "  | {what}: write {:.0} MiB, fsync | {pw:.1} | {ow:.1} | {kw:.1} | {:.2}x | {:.2}x |",
            p.2,
            pw / kw,
            pw / ow
        );
    }
}

/// A loop device over a file, detached on drop. The store lives on a block device in dom0
/// (a virtio disk), so the host makes and checks it as a block device too.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(file: &Path) -> Result<Self> {
        let dev = sys::run_text(Command::new("losetup").args(["--find", "--show"]).arg(file))?;
        Ok(Self { dev: PathBuf::from(dev.trim()) })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guests_dd_line() {
        let got = parse_dd("DD read 64 MiB in 4.92 s, write 8 MiB in 1.83 s");
        assert_eq!(got, Some((64.0, 4.92, 8.0, 1.83)));
        assert_eq!(parse_dd("DD read 64 MiB in s, write 8 MiB in 1.83 s"), None);
        assert_eq!(parse_dd("MARKER-FOUND"), None);
    }
}
