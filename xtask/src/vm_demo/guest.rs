//! Booting guests under QEMU (TCG) from NBD exports of parallaxd, concurrently, with a timeout.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What the guests boot.
pub struct Boot<'a> {
    /// bzImage.
    pub vmlinuz: &'a Path,
    /// initramfs.
    pub initrd: &'a Path,
    /// How each guest reaches its disk.
    pub disk: Disk<'a>,
    /// Per-guest limit.
    pub timeout: Duration,
    /// Directory for console logs.
    pub log_dir: &'a Path,
    /// `round1`, `round2`: prefix of the log names.
    pub round: &'a str,
}

/// How a guest's disk is attached.
#[derive(Clone, Copy)]
pub enum Disk<'a> {
    /// virtio-blk in QEMU, backed by parallaxd's NBD export of the guest's name on this port.
    Nbd(u16),
    /// vhost-user-blk: the virtqueues served by the program listening on `DIR/NAME.sock`,
    /// straight from the guest's memory (a shared memfd).
    VhostUser(&'a Path),
}

/// One guest's run.
pub struct Outcome {
    /// Guest (and VDI) name.
    pub name: String,
    /// Start of QEMU to its exit (or to the timeout).
    pub elapsed: Duration,
    /// QEMU exited 0 before the timeout.
    pub exited_ok: bool,
    /// Short description of how it ended.
    pub status: String,
    /// Console output.
    pub console: String,
    /// The console log file.
    pub log: PathBuf,
}

fn qemu_command(b: &Boot, name: &str, log: &Path) -> Result<Command> {
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone().context("cannot open the console log")?;
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-kernel"]);
    c.arg(b.vmlinuz).arg("-initrd").arg(b.initrd);
    c.args(["-append", &format!("console=ttyS0 panic=-1 loglevel=4 parallax.name={name}")]);
    match b.disk {
        Disk::Nbd(port) => {
            c.args(["-drive", &format!("file=nbd://127.0.0.1:{port}/{name},format=raw,if=virtio")]);
        }
        Disk::VhostUser(dir) => {
            // vhost-user needs the guest's RAM in memory the backend can map.
            c.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"]);
            let socket = dir.join(format!("{name}.sock"));
            c.args(["-chardev", &format!("socket,id=disk,path={}", socket.display())]);
            c.args(["-device", "vhost-user-blk-pci,chardev=disk,num-queues=2"]);
        }
    }
    c.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(c)
}

/// Starts every guest at once and waits for each (killing it at the timeout).
pub fn boot_all(b: &Boot, names: &[String]) -> Result<Vec<Outcome>> {
    eprintln!("vm-demo: {}: booting {} guest(s) (timeout {} s each)", b.round, names.len(), b.timeout.as_secs());
    let mut running: Vec<(String, PathBuf, Child, Instant)> = Vec::new();
    for name in names {
        let log = b.log_dir.join(format!("{}-{name}.log", b.round));
        let child = qemu_command(b, name, &log)?.spawn().context("cannot start qemu-system-x86_64")?;
        running.push((name.clone(), log, child, Instant::now()));
    }
    let mut done: Vec<Option<Outcome>> = running.iter().map(|_| None).collect();
    while done.iter().any(Option::is_none) {
        for (i, (name, log, child, start)) in running.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let st = child.try_wait().context("cannot poll qemu")?;
            let elapsed = start.elapsed();
            let ended = match st {
                Some(st) => Some((st.success(), format!("{st}"))),
                None if elapsed > b.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Some((false, format!("killed after {} s timeout", b.timeout.as_secs())))
                }
                None => None,
            };
            if let Some((ok, status)) = ended {
                let console = std::fs::read_to_string(&*log).unwrap_or_default();
                eprintln!("vm-demo: {}: {name} ended after {:.1} s ({status})", b.round, elapsed.as_secs_f64());
                done[i] =
                    Some(Outcome { name: name.clone(), elapsed, exited_ok: ok, status, console, log: log.clone() });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(done.into_iter().flatten().collect())
}

/// The last lines of a console, for failure messages.
pub fn console_tail(o: &Outcome) -> String {
    let lines: Vec<&str> = o.console.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
