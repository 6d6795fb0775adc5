//! `cargo xtask`: developer tasks for the Parallax workspace.
//!
//! * `cargo xtask bench-nbd [--quick]`: fio over NBD against parallaxd, qemu-nbd (qcow2 and raw)
//!   and nbdkit's memory plugin, printed as a Markdown table.
//! * `cargo xtask bench-import [--quick]`: `vdi fill` against `qemu-img convert` and `cp`.
//! * `cargo xtask vm-demo [--guests N] [--keep]`: N QEMU guests boot from clones of one golden
//!   image over NBD; checks each clone kept only its own writes (docs/vm-demo.md).
//! * `cargo xtask ring-test [--guests N]`: N simulated Xen guests over the blkif ring on clones
//!   of one golden VDI, every read verified; `cargo xtask ring-torture [--kills N]`: SIGKILL
//!   parallaxd under ring guests; `cargo xtask bench-ring [--quick]`: the ring beside NBD.

mod big_delete;
mod ceph;
mod cluster;
mod crash_states;
mod fio;
mod fuzz;
mod import;
mod install;
mod nbd;
mod parallaxd;
mod report;
mod ring;
mod servers;
mod setup;
mod snapshots;
mod sys;
mod torture;
mod vm_demo;
mod xen_demo;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for the Parallax workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The tasks.
#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmark parallaxd against qemu-nbd (qcow2, raw) and nbdkit memory with fio over NBD.
    BenchNbd(BenchNbdArgs),
    /// Benchmark `vdi fill` against `qemu-img convert -O qcow2` and `cp --sparse=always`.
    BenchImport(BenchImportArgs),
    /// Boot N QEMU guests from clones of one golden image over NBD and check each kept its own writes.
    VmDemo(vm_demo::VmDemoArgs),
    /// One guest on vhost-user-blk from parallaxd beside qemu-storage-daemon (qcow2): boot and
    /// dd inside the guest, as ratios (docs/performance.md).
    BenchVhost(vm_demo::bench::BenchVhostArgs),
    /// Boot Xen under QEMU (TCG) with parallaxd --xen in dom0 and N PV guests on clones of one
    /// golden VDI over the blkif ring; check every clone from outside (docs/xen.md).
    XenDemo(xen_demo::XenDemoArgs),
    /// SIGKILL parallaxd under a writing client, restart, and verify no flushed write is lost.
    Torture(torture::TortureArgs),
    /// N simulated Xen guests on clones of one golden VDI over the blkif ring, verified.
    RingTest(ring::RingTestArgs),
    /// SIGKILL parallaxd while simulated guests write through the ring; nothing flushed may be lost.
    RingTorture(ring::RingTortureArgs),
    /// 4 KiB random and 64 KiB sequential I/O through the simulated ring beside NBD.
    BenchRing(ring::BenchRingArgs),
    /// Run each fuzz target (fuzz/, cargo-fuzz) for a while; fail on any crash.
    Fuzz(fuzz::FuzzArgs),
    /// Build N power-cut states of scripted workloads from their recorded writes and check each.
    CrashStates(crash_states::CrashStatesArgs),
    /// Delete a large VDI through parallaxd while another VDI writes; report times and latencies.
    BigDelete(big_delete::BigDeleteArgs),
    /// What frequent snapshots cost: `vdi snap` latency, fio with 10 ms snapshots, snap-list and check.
    BenchSnapshots(snapshots::BenchSnapshotsArgs),
    /// A throwaway Ceph cluster and parallaxd hosts on one store in RADOS: serve, SIGKILL,
    /// take over, hand over, all verified; then fio beside qemu-nbd on RBD (docs/performance.md).
    Cluster(cluster::ClusterArgs),
    /// The README's test command: install what the tests drive (as root), then `cargo test --workspace`.
    Test(setup::TestArgs),
    /// Install the release binaries, man pages, completions, the systemd unit and a sample config.
    Install(install::InstallArgs),
    /// Write the man pages (vdi.1, vdi-*.1, parallaxd.8).
    Man(install::ManArgs),
}

/// Flags of `bench-nbd`.
#[derive(Debug, Args)]
pub struct BenchNbdArgs {
    /// Small disks and ~2 s runs (about a minute in all; for CI).
    #[arg(long)]
    pub quick: bool,
    /// Size of each served disk (K/M/G binary). Default 1G, or 128M with --quick.
    #[arg(long, value_parser = sys::parse_size)]
    pub size: Option<u64>,
    /// Seconds per fio workload. Default 10, or 2 with --quick.
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Bytes written before measuring parallaxd's peak RSS. Default 4G, or 512M with --quick.
    #[arg(long, value_parser = sys::parse_size)]
    pub rss_write: Option<u64>,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
    /// Also measure parallaxd as built from this git revision (a tag, a commit), in the same
    /// run, and report the ratio against it (built in a worktree under target/baseline).
    #[arg(long, value_name = "REV")]
    pub baseline: Option<String>,
}

/// Flags of `bench-import`.
#[derive(Debug, Args)]
pub struct BenchImportArgs {
    /// Use a 256M image (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Size of the ext4 image (K/M/G binary). Default 2G, or 256M with --quick.
    #[arg(long, value_parser = sys::parse_size)]
    pub size: Option<u64>,
    /// Timed runs of each tool (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Use the binaries already in target/release instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BenchNbd(a) => nbd::run(&a),
        Command::BenchImport(a) => import::run(&a),
        Command::VmDemo(a) => vm_demo::run(&a),
        Command::BenchVhost(a) => vm_demo::bench::run(&a),
        Command::XenDemo(a) => xen_demo::run(&a),
        Command::Torture(a) => torture::run(&a),
        Command::Fuzz(a) => fuzz::run(&a),
        Command::RingTest(a) => ring::run_test(&a),
        Command::BenchRing(a) => ring::run_bench(&a),
        Command::RingTorture(a) => ring::run_torture(&a),
        Command::CrashStates(a) => crash_states::run(&a),
        Command::BigDelete(a) => big_delete::run(&a),
        Command::BenchSnapshots(a) => snapshots::run(&a),
        Command::Test(a) => setup::run(&a),
        Command::Cluster(a) => cluster::run(&a),
        Command::Install(a) => install::run(&a),
        Command::Man(a) => install::run_man(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
