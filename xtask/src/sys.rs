//! Small helpers: sizes, finding tools and binaries, running commands with clear errors.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Parses a size like `4096`, `512M`, `2G` (K/M/G/T are binary multiples; a trailing `B`/`iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size like 512M or 2G"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 {
        return Err(format!("'{s}': size must be positive"));
    }
    Ok(bytes)
}

/// Formats a byte count as the largest exact binary unit (`1G`, `512M`, `4096`), as the tools accept it.
pub fn size_arg(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Human form of a byte count for reports: `1.0 GiB`, `512.0 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Finds `tool` on `PATH`, or fails naming the task that needs it and the package that has it.
pub fn require(tool: &str, package: &str, task: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    bail!(
        "{task} needs `{tool}`, which is not on PATH (install the `{package}` package, e.g. apt-get install {package})"
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The release binaries of the workspace: `$CARGO_TARGET_DIR/release` or `target/release`.
pub fn release_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { workspace_root().join(d) }
        }
        None => workspace_root().join("target"),
    };
    target.join("release")
}

/// Builds the release binaries of the given packages (unless `skip`), then checks that each binary exists.
pub fn release_binaries(packages: &[&str], binaries: &[&str], skip: bool) -> Result<Vec<PathBuf>> {
    if !skip {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args(["build", "--release", "--quiet"]);
        for p in packages {
            cmd.args(["-p", p]);
        }
        eprintln!("xtask: building release binaries of {} ...", packages.join(", "));
        let st = cmd.status().context("cannot run cargo")?;
        if !st.success() {
            bail!("`cargo build --release` of {} failed ({st})", packages.join(", "));
        }
    }
    let dir = release_dir();
    binaries
        .iter()
        .map(|b| {
            let p = dir.join(b);
            if is_executable(&p) {
                Ok(p)
            } else {
                bail!("{} is missing: run `cargo build --release -p daemon -p cli` first", p.display())
            }
        })
        .collect()
}

/// Runs a command to completion with stdin closed; fails with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{what}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let so = String::from_utf8_lossy(&out.stdout);
        let msg = if err.trim().is_empty() { so.trim() } else { err.trim() };
        bail!("`{what}` failed ({}): {}", out.status, tail(msg, 2000));
    }
    Ok(out)
}

/// Runs a command and returns its stdout as text.
pub fn run_text(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = run(cmd)?;
    String::from_utf8(out.stdout).with_context(|| format!("`{what}` printed something that is not UTF-8"))
}

/// The first line of a command's output (stdout, else stderr), or a note that it could not be run.
pub fn first_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("({program}: {e})"),
    }
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let s = a.to_string_lossy();
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"') { format!("{s:?}") } else { s.into_owned() }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr().context("cannot read the bound port")?.port())
}

/// Times a closure.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

/// `fsync`s one file (its data and metadata), as `sync FILE` would.
pub fn fsync(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {} to sync it", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

/// Flushes all dirty data of the system (`sync(2)`), so earlier writes don't spill into a timed run.
pub fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(size_arg(1 << 30), "1G");
        assert_eq!(size_arg(1536 << 20), "1536M");
        assert_eq!(size_arg(1000), "1000");
    }
}
