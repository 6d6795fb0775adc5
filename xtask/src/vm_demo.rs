//! `cargo xtask vm-demo [--guests N] [--keep]`: the guided tour. One golden ext4 image goes into a
//! Parallax store, is snapshotted and cloned N times; N QEMU guests (TCG) boot from the clones over
//! NBD at once, each leaving a marker file; the checks show each clone holds only its own marker,
//! the golden snapshot is untouched and the store grew by the guests' writes, not by N images. A
//! second boot finds the markers. See docs/vm-demo.md.

pub mod bench;
mod bench_host;
mod guest;
pub(crate) mod image;
pub(crate) mod setup;
mod vhost_client;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::parallaxd::Daemon;
use crate::sys;
use guest::{Boot, Outcome};

/// Size of the golden ext4 image.
const IMAGE_SIZE: u64 = 64 << 20;

/// Flags of `vm-demo`.
#[derive(Debug, Args)]
pub struct VmDemoArgs {
    /// Number of guests (clones of the golden image) booted at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub guests: u32,
    /// Keep the scratch directory (store, images, console logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Seconds each guest may take per boot. Default 120, plus 60 per guest beyond two.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
    /// Do not install missing packages with apt; fail instead.
    #[arg(long)]
    pub no_install: bool,
    /// How the guests reach their disks: QEMU's NBD client (`nbd`) or parallaxd serving the
    /// virtqueues itself (`vhost-user`, `--vhost-user-blk`).
    #[arg(long, value_enum, default_value_t = Transport::Nbd)]
    pub transport: Transport,
}

/// The disk transport of `vm-demo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// `-drive file=nbd://...,if=virtio`.
    Nbd,
    /// `-device vhost-user-blk-pci` on a socket of parallaxd.
    VhostUser,
}

/// The `vdi` command on a demo's store.
pub(crate) struct Vdi {
    /// The `vdi` binary.
    pub(crate) bin: PathBuf,
    /// The store (a file or a block device).
    pub(crate) store: PathBuf,
    /// `PARALLAX_RUN_DIR` for it.
    pub(crate) run_dir: PathBuf,
}

impl Vdi {
    /// `vdi --store STORE ARGS`.
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--store").arg(&self.store).args(args).env("PARALLAX_RUN_DIR", &self.run_dir);
        c
    }

    /// Runs `vdi ARGS` and returns its stdout, trimmed.
    pub(crate) fn text(&self, args: &[&str]) -> Result<String> {
        Ok(sys::run_text(&mut self.cmd(args))?.trim().to_string())
    }

    /// `vdi info --json`'s `allocated`: bytes in use in the store.
    fn allocated(&self) -> Result<u64> {
        let text = self.text(&["info", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&text).context("`vdi info --json` is not JSON")?;
        v.get("allocated").and_then(serde_json::Value::as_u64).context("`vdi info --json` has no `allocated`")
    }
}

/// Everything the checks and the summary need.
struct Demo {
    vdi: Vdi,
    work: PathBuf,
    image: PathBuf,
    snap: String,
    clones: Vec<(String, String)>,
    failures: Vec<String>,
}

impl Demo {
    fn fail(&mut self, msg: String) {
        eprintln!("vm-demo: CHECK FAILED: {msg}");
        self.failures.push(msg);
    }

    fn pass(&self, msg: &str) {
        eprintln!("vm-demo: ok: {msg}");
    }
}

/// Runs the demo.
pub fn run(args: &VmDemoArgs) -> Result<()> {
    setup::ensure_packages(args.no_install)?;
    let bins = sys::release_binaries(&["daemon", "cli"], &["parallaxd", "vdi"], args.no_build)?;
    let dir = tempfile::Builder::new().prefix("parallax-vm-demo-").tempdir().context("cannot create a temp dir")?;
    let result = run_in(args, &bins[0], &bins[1], dir.path());
    if args.keep {
        eprintln!("vm-demo: kept {}", dir.keep().display());
    }
    result
}

fn run_in(args: &VmDemoArgs, parallaxd: &Path, vdi_bin: &Path, work: &Path) -> Result<()> {
    let n = args.guests as usize;
    let timeout = Duration::from_secs(args.timeout.unwrap_or(120 + 60 * (n.saturating_sub(2) as u64)));
    let kernel = image::fetch_kernel(&sys::release_dir().with_file_name("vm-demo"))?;
    let initrd = image::build_initramfs(&kernel, work)?;
    let image = image::build_rootfs(work, IMAGE_SIZE, image::ROOT_INIT)?;
    let run_dir = work.join("run");
    std::fs::create_dir(&run_dir).context("cannot create the run dir")?;
    let vdi = Vdi { bin: vdi_bin.to_path_buf(), store: work.join("blockstore.dat"), run_dir };
    let mut demo =
        Demo { vdi, work: work.to_path_buf(), image, snap: String::new(), clones: Vec::new(), failures: vec![] };
    setup_store(&mut demo, n)?;
    let before = demo.vdi.allocated()?;
    let du_before = du(&demo.vdi.store)?;
    let sockets = work.join("sockets");
    std::fs::create_dir(&sockets).context("cannot create the socket dir")?;
    let transport = args.transport;
    let boot = |round: &'static str, port: u16| Boot {
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
        disk: match transport {
            Transport::Nbd => guest::Disk::Nbd(port),
            Transport::VhostUser => guest::Disk::VhostUser(&sockets),
        },
        timeout,
        log_dir: work,
        round,
    };
    let names: Vec<String> = demo.clones.iter().map(|(name, _)| name.clone()).collect();
    // With vhost-user, parallaxd serves each guest's clone on the guest's own socket.
    let extra: Vec<std::ffi::OsString> = match transport {
        Transport::Nbd => Vec::new(),
        Transport::VhostUser => names
            .iter()
            .flat_map(|n| {
                ["--vhost-user-blk".into(), format!("{}={n}", sockets.join(format!("{n}.sock")).display()).into()]
            })
            .collect(),
    };
    let round1 = boot_round(&demo, parallaxd, "round1", &names, &boot, &extra)?;
    check_consoles(&mut demo, &round1, "MARKER-WRITTEN");
    check_markers(&mut demo)?;
    check_golden(&mut demo)?;
    let growth = demo.vdi.allocated()?.saturating_sub(before);
    let du_growth = du(&demo.vdi.store)?.saturating_sub(du_before);
    let golden_used = check_growth(&mut demo, growth, du_growth)?;
    check_tree(&mut demo)?;
    // With vhost-user, round 2 adds a guest booting from a snapshot of the first clone, served
    // read-only (`VDI@SNAP`) beside the clone itself.
    let (mut names2, mut extra2) = (names.clone(), extra.clone());
    let reader = match transport {
        Transport::Nbd => None,
        Transport::VhostUser => {
            let of = names.first().context("no guests")?.clone();
            let sid = demo.vdi.text(&["snap", &of])?;
            let reader = format!("snap-of-{of}");
            let socket = sockets.join(format!("{reader}.sock"));
            extra2.extend(["--vhost-user-blk".into(), format!("{}={of}@{sid}", socket.display()).into()]);
            eprintln!("vm-demo: snapshot {sid} of {of}, served read-only to guest {reader}");
            names2.push(reader.clone());
            Some(reader)
        }
    };
    let round2 = boot_round(&demo, parallaxd, "round2", &names2, &boot, &extra2)?;
    let (snap_guest, round2): (Vec<Outcome>, Vec<Outcome>) =
        round2.into_iter().partition(|o| Some(&o.name) == reader.as_ref());
    check_consoles(&mut demo, &round2, "MARKER-FOUND");
    check_consoles(&mut demo, &snap_guest, "SNAPSHOT-READ-ONLY");
    print_summary(n, &round1, &round2, growth, du_growth, golden_used);
    if !demo.failures.is_empty() {
        bail!("{} check(s) failed:\n  {}", demo.failures.len(), demo.failures.join("\n  "));
    }
    eprintln!("vm-demo: all checks passed");
    Ok(())
}

/// golden, its snapshot, and the clones vm-1..vm-N.
fn setup_store(demo: &mut Demo, n: usize) -> Result<()> {
    let image = demo.image.to_string_lossy().into_owned();
    let golden = demo.vdi.text(&["create", "golden"])?;
    demo.vdi.text(&["fill", &golden, &image])?;
    demo.snap = demo.vdi.text(&["snap", &golden])?;
    eprintln!("vm-demo: VDI golden = {golden}, filled from {image}; snapshot {}", demo.snap);
    for k in 1..=n {
        let name = format!("vm-{k}");
        let id = demo.vdi.text(&["create", &name, "--from", &demo.snap])?;
        demo.clones.push((name, id));
    }
    eprintln!("vm-demo: {n} clone(s) of snapshot {}", demo.snap);
    Ok(())
}

/// Starts parallaxd, boots every guest, stops parallaxd (which must exit 0).
fn boot_round<'a>(
    demo: &Demo,
    parallaxd: &Path,
    round: &'static str,
    names: &[String],
    boot: &dyn Fn(&'static str, u16) -> Boot<'a>,
    extra: &[std::ffi::OsString],
) -> Result<Vec<Outcome>> {
    let log = demo.work.join(format!("parallaxd-{round}.log"));
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_os_str()).collect();
    let mut d = Daemon::start(parallaxd, &demo.vdi.store, &demo.vdi.run_dir, &log, &extra)?;
    let outcomes = guest::boot_all(&boot(round, d.port), names)?;
    d.check_alive()?;
    d.stop()?;
    Ok(outcomes)
}

/// Each guest powered off by itself in time and printed `WORD NAME`.
fn check_consoles(demo: &mut Demo, outcomes: &[Outcome], word: &str) {
    for o in outcomes {
        let want = format!("{word} {}", o.name);
        if !o.exited_ok {
            demo.fail(format!(
                "{} did not power off cleanly ({}); console:\n{}",
                o.name,
                o.status,
                guest::console_tail(o)
            ));
        } else if !o.console.lines().any(|l| l.trim_end().ends_with(&want)) {
            let log = o.log.display();
            demo.fail(format!("{}: console ({log}) lacks `{want}`:\n{}", o.name, guest::console_tail(o)));
        } else {
            demo.pass(&format!("{} printed `{want}` in {:.1} s", o.name, o.elapsed.as_secs_f64()));
        }
    }
}

/// Exports each clone and lists its root directory: its own marker, and no other.
fn check_markers(demo: &mut Demo) -> Result<()> {
    let exports = demo.work.join("exports");
    std::fs::create_dir_all(&exports).context("cannot create the exports dir")?;
    for (name, id) in demo.clones.clone() {
        let file = exports.join(format!("{name}.img"));
        let file_s = file.to_string_lossy().into_owned();
        demo.vdi.text(&["export", &id, &file_s])?;
        let markers = list_markers(&file)?;
        let want = vec![format!("marker-{name}")];
        if markers != want {
            demo.fail(format!("{name}: root directory holds markers {markers:?}, expected {want:?}"));
            continue;
        }
        let content = sys::run_text(Command::new("debugfs").args(["-R", &format!("cat /marker-{name}")]).arg(&file))?;
        if content.trim() != name {
            demo.fail(format!("{name}: /marker-{name} holds {:?}, expected {name:?}", content.trim()));
            continue;
        }
        demo.pass(&format!("{name}: its export holds /marker-{name} (\"{name}\") and no other marker"));
        std::fs::remove_file(&file).with_context(|| format!("cannot remove {file_s}"))?;
    }
    Ok(())
}

/// Names starting with `marker-` in the root directory of an ext4 image (`debugfs -R "ls /"`).
pub(crate) fn list_markers(image: &Path) -> Result<Vec<String>> {
    let text = sys::run_text(Command::new("debugfs").args(["-R", "ls -p /"]).arg(image))?;
    // `ls -p` prints /INODE/MODE/UID/GID/NAME/SIZE/ per entry.
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().trim_matches('/').split('/').nth(4).map(str::to_string))
        .filter(|n| n.starts_with("marker-"))
        .collect();
    names.sort();
    Ok(names)
}

/// The golden snapshot still equals the original image, and holds no marker.
fn check_golden(demo: &mut Demo) -> Result<()> {
    let snap = format!("@{}", demo.snap);
    let image = demo.image.to_string_lossy().into_owned();
    let st = demo.vdi.cmd(&["validate", &snap, &image]).output().context("cannot run vdi validate")?;
    if st.status.success() {
        demo.pass(&format!("snapshot {snap} still validates against the golden image"));
    } else {
        let out = String::from_utf8_lossy(&st.stdout).into_owned() + &String::from_utf8_lossy(&st.stderr);
        demo.fail(format!("snapshot {snap} no longer matches the golden image: {}", out.trim()));
    }
    let markers = list_markers(&demo.image)?;
    if !markers.is_empty() {
        demo.fail(format!("the golden image holds markers {markers:?}"));
    }
    Ok(())
}

/// Store growth must be the guests' writes, far below one image per guest. Returns the golden's used bytes.
fn check_growth(demo: &mut Demo, growth: u64, du_growth: u64) -> Result<u64> {
    let list = demo.vdi.text(&["list", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&list).context("`vdi list --json` is not JSON")?;
    let golden_used = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e.get("name").and_then(|n| n.as_str()) == Some("golden")))
        .and_then(|e| e.get("used"))
        .and_then(serde_json::Value::as_u64)
        .context("`vdi list --json` has no VDI golden with `used`")?;
    let n = demo.clones.len() as u64;
    let msg = format!(
        "store grew by {growth} bytes allocated ({}), {du_growth} bytes on disk, for {n} guest(s); \
         one full copy of golden would be {golden_used} bytes ({})",
        sys::human(growth),
        sys::human(golden_used)
    );
    if growth.saturating_mul(4) > golden_used.saturating_mul(n) {
        demo.fail(format!("{msg}: more than a quarter of N copies"));
    } else {
        demo.pass(&msg);
    }
    Ok(golden_used)
}

/// `vdi tree` shows golden, then the snapshot under it, then every clone under that.
fn check_tree(demo: &mut Demo) -> Result<()> {
    let tree = demo.vdi.text(&["tree"])?;
    eprintln!("vm-demo: vdi tree:\n{tree}");
    if tree_in_order(&tree, &demo.snap, demo.clones.iter().map(|(n, _)| n.as_str())) {
        demo.pass("vdi tree shows golden -> snapshot -> clones");
    } else {
        demo.fail(format!("vdi tree does not show golden -> snapshot {} -> every clone", demo.snap));
    }
    Ok(())
}

/// True if the line naming 'golden' comes first, then `snapshot SNAP`, then each clone `'NAME'`.
fn tree_in_order<'a>(tree: &str, snap: &str, mut clones: impl Iterator<Item = &'a str>) -> bool {
    let lines: Vec<&str> = tree.lines().collect();
    let find = |from: usize, needle: &str| lines.iter().skip(from).position(|l| l.contains(needle)).map(|i| i + from);
    let Some(golden) = find(0, "'golden'") else { return false };
    let Some(snap_line) = find(golden + 1, &format!("snapshot {snap} ")) else { return false };
    clones.all(|name| find(snap_line + 1, &format!("'{name}'")).is_some())
}

/// Allocated bytes of a file (`du --block-size=1`).
fn du(path: &Path) -> Result<u64> {
    let text = sys::run_text(Command::new("du").arg("--block-size=1").arg(path))?;
    text.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("cannot parse du output {text:?}"))
}

fn stats(outcomes: &[Outcome]) -> String {
    let mut t: Vec<f64> = outcomes.iter().map(|o| o.elapsed.as_secs_f64()).collect();
    t.sort_by(f64::total_cmp);
    if t.is_empty() {
        return "-".to_string();
    }
    let median = if t.len() % 2 == 1 { t[t.len() / 2] } else { (t[t.len() / 2 - 1] + t[t.len() / 2]) / 2.0 };
    format!("{:.1} / {median:.1} / {:.1}", t[0], t[t.len() - 1])
}

fn print_summary(n: usize, r1: &[Outcome], r2: &[Outcome], growth: u64, du_growth: u64, golden_used: u64) {
    println!();
    println!(
        "| guests | boot 1 s (min / median / max) | boot 2 s (min / median / max) | store growth (allocated) | store growth (du) | image size (used) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {} | {} | {growth} B ({}) | {du_growth} B | {} B ({}; {} virtual) |",
        stats(r1),
        stats(r2),
        sys::human(growth),
        golden_used,
        sys::human(golden_used),
        sys::human(IMAGE_SIZE)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tree() {
        let tree = "VDI 0 'golden' (64.0 MiB)\n└── snapshot 1 2026-12-01 02:16:45\n    ├── VDI 1 'vm-1' (clone)\n    └── VDI 2 'vm-2'\n";
        assert!(tree_in_order(tree, "1", ["vm-1", "vm-2"].into_iter()));
        assert!(!tree_in_order(tree, "1", ["vm-3"].into_iter()));
        assert!(!tree_in_order(tree, "2", ["vm-1"].into_iter()));
    }
}
