//! `cargo xtask test`: the README's test command. Installs what the tests drive (Debian
//! packages, when run as root and something is missing), starts a throwaway Ceph cluster for
//! the RADOS tests, then runs `cargo test --workspace`.
//! A tool that is missing and cannot be installed fails the run with the command to install it:
//! no test is skipped for want of a tool.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Each program the tests run, and the Debian package it comes in.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdfuse", "libnbd-bin"),
    ("nbdsh", "python3-libnbd"),
    ("nbdkit", "nbdkit"),
    ("fio", "fio"),
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("dot", "graphviz"),
    ("systemd-analyze", "systemd"),
    ("openssl", "openssl"),
];

/// QEMU's RBD driver, a module in a package of its own: `cargo xtask cluster` serves an RBD
/// image with qemu-nbd beside parallaxd. It loads only into the same QEMU build as qemu-utils,
/// so it comes from where qemu-utils came from (bookworm-backports on this project's machines).
pub const QEMU_RBD_MODULE: (&str, &str) = ("block-rbd.so", "qemu-block-extra");

/// True if QEMU's module `name` is installed (`/usr/lib/<triplet>/qemu/<name>`).
pub fn qemu_module_installed(name: &str) -> bool {
    std::fs::read_dir("/usr/lib").into_iter().flatten().flatten().any(|e| e.path().join("qemu").join(name).is_file())
}

/// Flags of `test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Only check and install the tools; do not run the tests.
    #[arg(long)]
    pub setup_only: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

fn on_path(program: &str) -> bool {
    let path = format!("/usr/sbin:/usr/bin:/sbin:/bin:{}", std::env::var("PATH").unwrap_or_default());
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// Installs the packages of missing tools (as root), or says what to install.
pub fn setup() -> Result<()> {
    // The vhost-user test realises a disk in a real QEMU: qemu-system-x86 from
    // bookworm-backports, as vm-demo installs it (matching qemu-utils 10.x).
    if !on_path("qemu-system-x86_64") {
        crate::vm_demo::setup::ensure_packages(false)?;
    }
    // The RADOS tests run against a throwaway Ceph cluster (crate::ceph).
    let all = || TOOLS.iter().chain(crate::ceph::TOOLS);
    let mut missing: Vec<&str> = all().filter(|(t, _)| !on_path(t)).map(|(_, p)| *p).collect();
    if !qemu_module_installed(QEMU_RBD_MODULE.0) {
        missing.push(QEMU_RBD_MODULE.1);
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        eprintln!("xtask: every tool the tests drive is installed");
        return Ok(());
    }
    let install = format!("apt-get install -y --no-install-recommends {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the tests need {}; as root run: apt-get update && {install}", missing.join(", "));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    // Where the machine takes QEMU from bookworm-backports (qemu-system-x86 for the guests),
    // qemu-utils must come from there too, or apt would pull the two apart.
    let backports = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"].iter().any(|p| {
        let read = |f: &std::path::Path| std::fs::read_to_string(f).unwrap_or_default().contains("bookworm-backports");
        let p = std::path::Path::new(p);
        if p.is_dir() { std::fs::read_dir(p).into_iter().flatten().flatten().any(|e| read(&e.path())) } else { read(p) }
    });
    let qemu: Vec<&str> = ["qemu-utils", QEMU_RBD_MODULE.1].into_iter().filter(|p| missing.contains(p)).collect();
    if backports && !qemu.is_empty() {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends", "-t", "bookworm-backports"];
        args.extend(&qemu);
        apt(&args)?;
        missing.retain(|p| !qemu.contains(p));
    }
    if !missing.is_empty() {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        apt(&args)?;
    }
    let mut still: Vec<&str> = all().filter(|(t, _)| !on_path(t)).map(|(t, _)| *t).collect();
    if !qemu_module_installed(QEMU_RBD_MODULE.0) {
        still.push(QEMU_RBD_MODULE.0);
    }
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    Ok(())
}

/// `cargo xtask test`.
pub fn run(a: &TestArgs) -> Result<()> {
    setup()?;
    if a.setup_only {
        return Ok(());
    }
    // The RADOS backend's tests (the engine's model and crash states on RADOS, the lease) run
    // against a throwaway cluster that lives as long as this run.
    let ceph = crate::ceph::Ceph::for_tests()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args(["test", "--workspace"])
        .args(&a.cargo_args)
        .env("PARALLAX_TEST_CEPH_CONF", &ceph.conf)
        .status()
        .context("running cargo test")?;
    drop(ceph);
    if !st.success() {
        bail!("cargo test --workspace failed ({st})");
    }
    Ok(())
}
