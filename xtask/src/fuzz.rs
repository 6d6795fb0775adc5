//! `fuzz`: runs every cargo-fuzz target under `fuzz/` for a fixed time and fails on any crash.
//!
//! Needs `cargo install cargo-fuzz`. The stable toolchain is used with `RUSTC_BOOTSTRAP=1` (cargo
//! fuzz passes nightly-only `-Z` flags). Each target starts from a copy of its committed seed
//! corpus (`fuzz/corpus/<target>/`), so runs never add files to the repository; a crashing input
//! is saved under `fuzz/artifacts/<target>/`.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::sys;

/// The fuzz targets, in run order.
pub const TARGETS: [&str; 5] = ["store_image", "nbd_session", "blkif_request", "ring_handshake", "cli_ids"];

/// Fuzz targets whose inputs are served on threads (see the `-detect_leaks=0` note in `run`).
const THREADED_TARGETS: [&str; 1] = ["nbd_session"];

/// Flags of `fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target (after building).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Run only this target (repeatable); default: all.
    #[arg(long)]
    pub target: Vec<String>,
    /// Sanitizer passed to `cargo fuzz` (address, none, ...).
    #[arg(long, default_value = "address")]
    pub sanitizer: String,
}

/// Runs the targets and prints a table of executions on stdout.
pub fn run(a: &FuzzArgs) -> Result<()> {
    let fuzz_dir = sys::workspace_root().join("fuzz");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!("fuzz needs cargo-fuzz: run `cargo install cargo-fuzz`");
    }
    let targets: Vec<String> =
        if a.target.is_empty() { TARGETS.iter().map(|s| s.to_string()).collect() } else { a.target.clone() };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target '{t}' (known: {})", TARGETS.join(", "));
        }
    }
    let fuzz_cmd = || {
        let mut c = Command::new(&cargo);
        c.current_dir(&fuzz_dir).env("RUSTC_BOOTSTRAP", "1").arg("fuzz");
        c
    };
    eprintln!("xtask: fuzz: building {} target(s) ...", targets.len());
    for t in &targets {
        let st = fuzz_cmd()
            .args(["build", "--sanitizer", &a.sanitizer, t])
            .status()
            .context("cannot run cargo fuzz build")?;
        if !st.success() {
            bail!("`cargo fuzz build {t}` failed ({st})");
        }
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in &targets {
        let work = tempfile::Builder::new().prefix(&format!("parallax-fuzz-{t}-")).tempdir()?;
        let seeds = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir(work.path().join("corpus"))?;
        let log = work.path().join("fuzz.log");
        let logf = std::fs::File::create(&log)?;
        eprintln!("xtask: fuzz: {t} for {} s ...", a.seconds);
        let mut cmd = fuzz_cmd();
        cmd.args(["run", "--sanitizer", &a.sanitizer, t])
            .arg(work.path().join("corpus"))
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", a.seconds))
            .args(["-print_final_stats=1", "-timeout=20", "-rss_limit_mb=3072"]);
        if THREADED_TARGETS.contains(&t.as_str()) {
            // These targets serve a session on scoped threads. A scoped thread tells its scope
            // it is done before its thread-local destructors have run, so LeakSanitizer, run by
            // libFuzzer right after the input, can find std's handle of a thread that is still
            // exiting (`Arc<thread::Inner>` from `Thread::new`, plus glibc's TLS destructor
            // record) — a false "leak" that no code of ours can avoid. Crashes, hangs and
            // sanitizer errors are still caught; only leak detection is off for them.
            cmd.arg("-detect_leaks=0");
        }
        let st = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .status()
            .context("cannot run cargo fuzz run")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let execs = stat(&text, "stat::number_of_executed_units:");
        let corpus = count_files(&work.path().join("corpus"));
        if !st.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("xtask: fuzz: {t} FAILED ({st}):\n{}", tail.join("\n"));
            failed.push(t.clone());
        }
        rows.push((t.clone(), execs, corpus, st.success()));
    }
    println!("## fuzz ({} s per target, sanitizer {})\n", a.seconds, a.sanitizer);
    println!("| target | executions | exec/s | corpus after | result |\n|---|---:|---:|---:|---|");
    for (t, execs, corpus, ok) in &rows {
        let e = execs.map_or("?".to_string(), |e| e.to_string());
        let rate = execs.map_or("?".to_string(), |e| (e / a.seconds).to_string());
        println!("| {t} | {e} | {rate} | {corpus} | {} |", if *ok { "no crash" } else { "CRASH" });
    }
    if !failed.is_empty() {
        bail!("crash in {} (inputs saved under fuzz/artifacts/)", failed.join(", "));
    }
    Ok(())
}

/// The number after `key` in libFuzzer's final stats.
fn stat(text: &str, key: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| l.trim().strip_prefix(key).and_then(|v| v.trim().parse().ok()))
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn final_stats() {
        let t = "#123 DONE\nstat::number_of_executed_units: 4567\nstat::peak_rss_mb: 40\n";
        assert_eq!(super::stat(t, "stat::number_of_executed_units:"), Some(4567));
        assert_eq!(super::stat("nothing", "stat::number_of_executed_units:"), None);
    }
}
