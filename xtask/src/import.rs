//! `bench-import`: importing a raw ext4 image with `vdi fill`, `qemu-img convert` and `cp`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::BenchImportArgs;
use crate::report;
use crate::sys;

const TASK: &str = "bench-import";

/// Largest pseudo-random source file written into the image at once.
const SRC_FILE: u64 = 32 << 20;

/// The tools compared, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    VdiFill,
    QemuImg,
    Cp,
}

impl Tool {
    const ALL: [Tool; 3] = [Tool::VdiFill, Tool::QemuImg, Tool::Cp];

    fn title(self) -> &'static str {
        match self {
            Tool::VdiFill => "vdi fill (fresh store)",
            Tool::QemuImg => "qemu-img convert -O qcow2",
            Tool::Cp => "cp --sparse=always",
        }
    }
}

/// Runs the benchmark and prints its report on stdout (progress goes to stderr).
pub fn run(a: &BenchImportArgs) -> Result<()> {
    let size = a.size.unwrap_or(if a.quick { 256 << 20 } else { 2 << 30 });
    if size < 16 << 20 {
        bail!("--size must be at least 16M for an ext4 image with data in it");
    }
    for (tool, pkg) in
        [("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs"), ("qemu-img", "qemu-utils"), ("cp", "coreutils")]
    {
        sys::require(tool, pkg, TASK)?;
    }
    // Machine and start date, taken before the runs.
    let machine = report::machine();
    let vdi = sys::release_binaries(&["cli"], &["vdi"], a.no_build)?.remove(0);

    let work = tempfile::Builder::new().prefix("parallax-import-").tempdir().context("cannot create a temp dir")?;
    let image = work.path().join("image.raw");
    let data = make_image(&image, size, work.path())?;
    let image_alloc = allocated(&image)?;
    warm(&image)?;

    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); Tool::ALL.len()];
    let mut out_size = [0u64; 3];
    for run in 0..a.runs {
        // Interleave the tools so that drift over time affects each alike.
        for (t, tool) in Tool::ALL.iter().enumerate() {
            eprintln!("xtask: run {}/{}: {} ...", run + 1, a.runs, tool.title());
            let (d, used) = time_one(*tool, &vdi, &image, work.path(), run == 0)?;
            times[t].push(d);
            out_size[t] = used;
        }
    }

    println!("## bench-import{}\n", if a.quick { " (--quick)" } else { "" });
    println!("{machine}");
    println!("{}", report::versions(&[("qemu-img", &["--version"]), ("cp", &["--version"]), ("mkfs.ext4", &["-V"])]));
    println!(
        "- Image: {} raw ext4 (`truncate`, `mkfs.ext4 -q`) holding {} of pseudo-random files written with \
         `debugfs -w -R write`; {} allocated on disk.",
        sys::human(size),
        sys::human(data),
        sys::human(image_alloc),
    );
    println!(
        "- Timing: wall time of the command plus an fsync of its output (the store file, the .qcow2, the copy), \
         for all three alike; an untimed sync(2) before each run. {} runs each, interleaved; median reported. \
         The image is in the page cache for every run (the cache cannot be dropped reliably here), so this \
         measures the tools, not the source disk.",
        a.runs
    );
    println!();
    let mut header = vec!["Tool".to_string()];
    header.extend((1..=a.runs).map(|i| format!("run {i}")));
    header.extend(["median".to_string(), "output on disk".to_string(), "median vs qemu-img".to_string()]);
    let medians: Vec<f64> = times.iter().map(|t| median(t)).collect();
    let mut rows = Vec::new();
    for (t, tool) in Tool::ALL.iter().enumerate() {
        let mut row = vec![tool.title().to_string()];
        row.extend(times[t].iter().map(|d| format!("{:.2} s", d.as_secs_f64())));
        row.push(format!("{:.2} s", medians[t]));
        row.push(sys::human(out_size[t]));
        row.push(report::ratio(medians[t], medians[1]));
        rows.push(row);
    }
    print!("{}", report::table(&header, &rows));
    println!();
    println!("vdi fill / qemu-img convert (median wall time): {}", report::ratio(medians[0], medians[1]));
    Ok(())
}

/// Times one tool once; returns the time and the bytes its output occupies on disk.
fn time_one(tool: Tool, vdi: &Path, image: &Path, work: &Path, validate: bool) -> Result<(Duration, u64)> {
    sys::sync_all();
    let result = match tool {
        Tool::VdiFill => {
            let dir = work.join("store");
            let run_dir = dir.join("run");
            std::fs::create_dir_all(&run_dir).context("cannot create the store dir")?;
            let store = dir.join("blockstore.dat");
            let vdi_cmd = || {
                let mut c = Command::new(vdi);
                c.arg("--store").arg(&store).env("PARALLAX_RUN_DIR", &run_dir);
                c
            };
            let out = sys::run_text(vdi_cmd().args(["create", "image"]))?;
            let id = out.trim();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
                bail!("`vdi create` printed '{id}', not a VDI id");
            }
            sys::sync_all();
            let ((), d) = sys::timed(|| {
                sys::run(vdi_cmd().args(["fill", id]).arg(image))?;
                sys::fsync(&store)
            })?;
            if validate {
                let st = vdi_cmd().args(["validate", id]).arg(image).output().context("cannot run `vdi validate`")?;
                if !st.status.success() {
                    bail!(
                        "`vdi validate` after `vdi fill` says the VDI differs from the image: {}{}",
                        String::from_utf8_lossy(&st.stdout).trim(),
                        String::from_utf8_lossy(&st.stderr).trim()
                    );
                }
            }
            let used = allocated(&store)?;
            std::fs::remove_dir_all(&dir).context("cannot remove the store")?;
            (d, used)
        }
        Tool::QemuImg => {
            let out = work.join("out.qcow2");
            let ((), d) = sys::timed(|| {
                sys::run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(image).arg(&out))?;
                sys::fsync(&out)
            })?;
            let used = allocated(&out)?;
            remove(&out)?;
            (d, used)
        }
        Tool::Cp => {
            let out = work.join("copy.raw");
            let ((), d) = sys::timed(|| {
                sys::run(Command::new("cp").arg("--sparse=always").arg(image).arg(&out))?;
                sys::fsync(&out)
            })?;
            let used = allocated(&out)?;
            remove(&out)?;
            (d, used)
        }
    };
    Ok(result)
}

/// Makes the ext4 image; returns the bytes of file data written into it.
fn make_image(image: &Path, size: u64, work: &Path) -> Result<u64> {
    eprintln!("xtask: making a {} ext4 image ...", sys::human(size));
    File::create(image).and_then(|f| f.set_len(size)).with_context(|| format!("cannot create {}", image.display()))?;
    sys::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
    let total = size / 4;
    let src: PathBuf = work.join("src.bin");
    let mut written = 0u64;
    let mut i = 0u64;
    while written < total {
        let len = SRC_FILE.min(total - written);
        write_random(&src, len, 0x9E37_79B9_7F4A_7C15 ^ (i + 1))?;
        let req = format!("write {} /data-{i:03}.bin", src.display());
        let out = sys::run(Command::new("debugfs").args(["-w", "-R", &req]).arg(image))?;
        // debugfs exits 0 even when a request fails; it says so on stderr.
        let err = String::from_utf8_lossy(&out.stderr);
        if let Some(l) = err.lines().find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()) {
            bail!("`debugfs -w -R \"{req}\"` failed: {l}");
        }
        written += len;
        i += 1;
    }
    remove(&src)?;
    let alloc = allocated(image)?;
    if alloc < total {
        bail!(
            "the image has only {} allocated after writing {} into it: debugfs did not write the files",
            sys::human(alloc),
            sys::human(total)
        );
    }
    Ok(written)
}

/// Writes `len` bytes of xorshift64 output (deterministic per `seed`) to `path`.
fn write_random(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads the whole image once so every timed run finds it in the page cache.
fn warm(path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))? > 0 {}
    Ok(())
}

/// Bytes a file occupies on disk (allocated blocks, not its apparent size).
fn allocated(path: &Path) -> Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(m.blocks() * 512)
}

fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Median in seconds (mean of the middle two for an even count).
fn median(d: &[Duration]) -> f64 {
    let mut s: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = Duration::from_secs;
        assert_eq!(median(&[s(3), s(1), s(2)]), 2.0);
        assert_eq!(median(&[s(4), s(1)]), 2.5);
    }
}
