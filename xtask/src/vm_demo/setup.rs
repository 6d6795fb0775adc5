//! Installing the host packages the demo needs, idempotently, and saying what it does.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sys;

/// Packages from bookworm itself: (package, a file it provides, for the message).
const PLAIN: &[(&str, &str)] = &[
    ("busybox-static", "/bin/busybox"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
    ("cpio", "/usr/bin/cpio"),
    ("xz-utils", "/usr/bin/xz"),
    ("gzip", "/bin/gzip"),
    ("kmod", "/sbin/depmod"),
];

/// qemu-system-x86 must come from bookworm-backports to match the installed qemu-utils 10.x.
const QEMU_PKG: &str = "qemu-system-x86";
const BACKPORTS: &str = "bookworm-backports";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Installs whatever is missing; `skip` only checks and fails naming what is missing.
pub fn ensure_packages(skip: bool) -> Result<()> {
    let missing: Vec<&str> = PLAIN.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    let need_qemu = !installed(QEMU_PKG);
    if missing.is_empty() && !need_qemu {
        eprintln!("vm-demo: packages present: {QEMU_PKG}, {}", names(PLAIN).join(", "));
        return Ok(());
    }
    if skip {
        let mut all = missing.clone();
        if need_qemu {
            all.push(QEMU_PKG);
        }
        bail!("missing packages (run without --no-install to install them): {}", all.join(", "));
    }
    if need_qemu {
        add_backports_suite()?;
    }
    apt(&["update", "-q"])?;
    if !missing.is_empty() {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)?;
    }
    if need_qemu {
        apt(&["install", "-y", "-q", "-t", BACKPORTS, QEMU_PKG])?;
    }
    check_qemu_img_version()
}

fn names(list: &[(&str, &str)]) -> Vec<String> {
    list.iter().map(|(p, _)| p.to_string()).collect()
}

/// True if dpkg knows `pkg` as installed.
fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt(args: &[&str]) -> Result<()> {
    eprintln!("vm-demo: running apt-get {}", args.join(" "));
    let stdout = std::io::stderr().as_fd().try_clone_to_owned().context("cannot duplicate stderr")?;
    let st = Command::new("apt-get")
        .args(args)
        .stdout(stdout)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get (the demo installs packages with apt: run it as root on Debian bookworm)")?;
    if !st.success() {
        bail!("`apt-get {}` failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Adds bookworm-backports to the `Suites:` line that holds `bookworm bookworm-updates`, if absent.
fn add_backports_suite() -> Result<()> {
    let file = find_debian_sources()?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let Some(new) = with_backports(&text) else {
        eprintln!("vm-demo: {} already lists {BACKPORTS}", file.display());
        return Ok(());
    };
    eprintln!("vm-demo: adding {BACKPORTS} to the Suites: line of {}", file.display());
    std::fs::write(&file, new).with_context(|| format!("cannot write {}", file.display()))
}

/// The file in /etc/apt/sources.list.d whose Suites: line has `bookworm bookworm-updates`.
fn find_debian_sources() -> Result<PathBuf> {
    let dir = Path::new(SOURCES_DIR);
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {SOURCES_DIR}"))?;
    for e in entries {
        let path = e.with_context(|| format!("cannot list {SOURCES_DIR}"))?.path();
        if path.extension().is_none_or(|x| x != "sources") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if text.lines().any(is_main_suites_line) {
            return Ok(path);
        }
    }
    bail!("no file in {SOURCES_DIR} has a `Suites: bookworm bookworm-updates` line; add {BACKPORTS} by hand")
}

fn is_main_suites_line(line: &str) -> bool {
    let Some(rest) = line.trim().strip_prefix("Suites:") else { return false };
    let words: Vec<&str> = rest.split_whitespace().collect();
    words.contains(&"bookworm") && words.contains(&"bookworm-updates")
}

/// The sources text with bookworm-backports appended to the main Suites: line, or None if present.
fn with_backports(text: &str) -> Option<String> {
    let mut changed = false;
    let mut out = String::with_capacity(text.len() + 32);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        if is_main_suites_line(body) && !body.split_whitespace().any(|w| w == BACKPORTS) {
            out.push_str(body.trim_end());
            out.push(' ');
            out.push_str(BACKPORTS);
            out.push_str(&line[body.len()..]);
            changed = true;
        } else {
            out.push_str(line);
        }
    }
    changed.then_some(out)
}

/// qemu-img must still be 10.x (apt would downgrade qemu-utils if qemu came from plain bookworm).
fn check_qemu_img_version() -> Result<()> {
    let v = sys::first_line("qemu-img", &["--version"]);
    eprintln!("vm-demo: {v}");
    if !v.starts_with("qemu-img version 10.") {
        bail!("qemu-img is not 10.x after installing {QEMU_PKG}: {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_backports_once() {
        let text = "Types: deb\nSuites: bookworm bookworm-updates\nComponents: main\n\nSuites: bookworm-security\n";
        let new = with_backports(text).expect("added");
        assert!(new.contains("Suites: bookworm bookworm-updates bookworm-backports\n"));
        assert!(new.contains("Suites: bookworm-security\n"));
        assert_eq!(with_backports(&new), None);
    }
}
