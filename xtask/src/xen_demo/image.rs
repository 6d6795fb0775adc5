//! The images of `xen-demo`: the cached Debian parts (Xen, the kernel, the dom0 root), the dom0
//! disk made from them, and the per-run demo disk (parallaxd, the guests' kernel, initramfs and
//! configurations, the script dom0 runs).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sys;
use crate::vm_demo::image::{Kernel, build_initramfs_with, kernel_version, write_exec};

/// Builds the cached Debian parts (see the script's header).
const BASE_SCRIPT: &str = include_str!("dom0-base.sh");
/// dom0's demo script, run from the demo disk.
const DEMO_INIT: &str = include_str!("dom0-init.sh");
/// The guests' /init.
const GUEST_INIT: &str = include_str!("guest-init.sh");
/// Modules the guests load: the blkif frontend and ext4.
const GUEST_MODULES: &[&str] = &["xen_blkfront", "crc32c_generic", "ext4"];

/// dom0's PID 1 in the cached root: mounts the demo disk (the third virtio disk) and runs its script.
pub const DOM0_INIT: &str = "/usr/sbin/xen-demo-init";
const DOM0_BOOTSTRAP: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mkdir -p /demo
if ! mount -o ro /dev/vdc /demo; then
    echo "XEN-DEMO: DONE fail (cannot mount the demo disk /dev/vdc)" > /dev/hvc0
    echo o > /proc/sysrq-trigger
fi
exec /bin/bash /demo/init
"#;

/// libxl runs it with `add` once the backend is in InitWait, and `remove` after Closed;
/// parallaxd attaches the VDI itself, so it only reports success.
const BLOCK_PARALLAX: &str = r#"#!/bin/sh
# /etc/xen/scripts/block-parallax: parallaxd opens the VDI named by `params` itself.
case "$1" in
add) xenstore-write "$XENBUS_PATH/hotplug-status" connected ;;
esac
exit 0
"#;

/// Debian's /etc/init.d/xen reads this: keep the guests' consoles in /var/log/xen/console.
const DEFAULT_XEN: &str = "XENSTORED_ARGS=\nXENCONSOLED_ARGS=\"--log=guest --log-dir=/var/log/xen/console\"\n";

/// The kernel's blkback would answer on backend/vbd too; `install ... /bin/false` stops even a
/// load by name (a blacklist line does not).
const MODPROBE_CONF: &str = "install xen-blkback /bin/false\n";

/// Where the Debian parts are cached: `$PARALLAX_XEN_CACHE`, or /var/cache/parallax/xen-demo.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PARALLAX_XEN_CACHE").map_or_else(|| PathBuf::from("/var/cache/parallax/xen-demo"), PathBuf::from)
}

/// The cached Debian parts.
pub struct Base {
    /// The cache directory.
    pub dir: PathBuf,
    /// Xen, as a multiboot ELF.
    pub xen: PathBuf,
    /// The kernel of dom0 and the guests.
    pub vmlinuz: PathBuf,
    /// dom0's initramfs.
    pub initrd: PathBuf,
    /// The dom0 root directory.
    pub rootfs: PathBuf,
    /// The kernel with its modules (from the dom0 root), for the guests' initramfs.
    pub kernel: Kernel,
}

impl Base {
    /// Builds what is missing from the cache (the first run fetches ~300 MB of Debian packages
    /// and takes several minutes) and returns the parts.
    pub fn ensure(dir: &Path) -> Result<Self> {
        // A cache keeps the kernel it was built with, even after Debian publishes a newer one.
        let version_file = dir.join("kernel.version");
        let version = match std::fs::read_to_string(&version_file) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => kernel_version()?,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let script = dir.join("dom0-base.sh");
        write_exec(&script, BASE_SCRIPT)?;
        let stamped = dir.join("debs.stamp").exists() && dir.join("rootfs.stamp").exists();
        if !stamped {
            eprintln!("xen-demo: building the Debian parts into {} (once; several minutes)", dir.display());
        }
        let st =
            Command::new("bash").arg(&script).arg(dir).arg(&version).status().context("cannot run dom0-base.sh")?;
        if !st.success() {
            bail!("{} failed ({st})", script.display());
        }
        std::fs::write(&version_file, format!("{version}\n")).context("cannot write kernel.version")?;
        let rootfs = dir.join("rootfs");
        let modules = rootfs.join(format!("lib/modules/{version}"));
        let base = Self {
            xen: dir.join("xen.elf"),
            vmlinuz: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            kernel: Kernel { version, vmlinuz: dir.join("vmlinuz"), modules },
            rootfs,
            dir: dir.to_path_buf(),
        };
        for f in [&base.xen, &base.vmlinuz, &base.initrd] {
            if !f.is_file() {
                bail!("{} is missing after dom0-base.sh; remove {} and run again", f.display(), dir.display());
            }
        }
        Ok(base)
    }
}

/// dom0's root disk: the cached root with the demo's few fixed files, as ext4. Cached too, and
/// rebuilt when those files change.
pub fn dom0_image(base: &Base) -> Result<PathBuf> {
    let files: [(&str, &str, bool); 4] = [
        (DOM0_INIT, DOM0_BOOTSTRAP, true),
        ("/etc/xen/scripts/block-parallax", BLOCK_PARALLAX, true),
        ("/etc/default/xen", DEFAULT_XEN, false),
        ("/etc/modprobe.d/parallax-xen-demo.conf", MODPROBE_CONF, false),
    ];
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    let stamp = format!("{:016x}\n", h.finish());
    let image = base.dir.join("dom0.img");
    let stamp_file = base.dir.join("dom0.img.stamp");
    if image.is_file() && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        eprintln!("xen-demo: dom0 image {} is up to date", image.display());
        return Ok(image);
    }
    for (path, text, exec) in files {
        let dest = base.rootfs.join(path.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        if exec {
            write_exec(&dest, text)?;
        } else {
            std::fs::write(&dest, text).with_context(|| format!("cannot write {}", dest.display()))?;
        }
    }
    eprintln!("xen-demo: making the dom0 image {}", image.display());
    let _ = std::fs::remove_file(&stamp_file);
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image).and_then(|f| f.set_len(3 << 30)).context("cannot create dom0.img")?;
    sys::run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "dom0root", "-d"]).arg(&base.rootfs).arg(&image))?;
    std::fs::write(&stamp_file, stamp).context("cannot write the dom0 image stamp")?;
    Ok(image)
}

/// The per-run demo disk: dom0's script and its configuration, parallaxd, the guests' kernel,
/// initramfs and one `xl` configuration per guest and round.
pub fn demo_disk(
    work: &Path,
    base: &Base,
    parallaxd: &Path,
    names: &[String],
    fs_mib: u64,
    compare: bool,
) -> Result<PathBuf> {
    let dir = work.join("demo");
    std::fs::create_dir_all(&dir).context("cannot create the demo dir")?;
    write_exec(&dir.join("init"), DEMO_INIT)?;
    let tags = |parallax: bool| {
        let tags: Vec<&str> = super::BENCH_RUNS.iter().filter(|r| r.parallax == parallax).map(|r| r.tag).collect();
        tags.join(" ")
    };
    let conf = format!(
        "GUESTS=\"{}\"\nCOMPARE={}\nBENCH_PARALLAX=\"{}\"\nBENCH_BLKBACK=\"{}\"\n",
        names.join(" "),
        if compare { "1" } else { "" },
        tags(true),
        tags(false)
    );
    std::fs::write(dir.join("demo.conf"), conf).context("demo.conf")?;
    // Without its debug information parallaxd is a fraction of the size.
    sys::run(Command::new("objcopy").arg("--strip-debug").arg(parallaxd).arg(dir.join("parallaxd")))?;
    std::fs::copy(&base.vmlinuz, dir.join("vmlinuz")).context("cannot copy vmlinuz")?;
    build_initramfs_with(&base.kernel, &dir, GUEST_MODULES, GUEST_INIT, "guest-initrd.gz")?;
    std::fs::remove_dir_all(dir.join("guest-initrd.gz.d")).context("cannot remove the initramfs tree")?;
    for (k, name) in names.iter().enumerate() {
        for round in [1, 2] {
            let vcpus = super::guest_vcpus(k);
            let cfg = guest_config(name, &round.to_string(), fs_mib, &parallax_disk(name), vcpus, None);
            std::fs::write(dir.join(format!("{name}-round{round}.cfg")), cfg)
                .context("cannot write a guest configuration")?;
        }
    }
    if compare {
        // The same two-vCPU guest alone: on parallaxd (a clone per run) with one queue per
        // vCPU and with one queue, and on the kernel's blkback serving the fourth disk, a raw
        // copy of the golden image; each with one dd and with two at once.
        for run in super::BENCH_RUNS {
            let disk = if run.parallax { parallax_disk(&format!("bench-{}", run.tag)) } else { BLKBACK_DISK.into() };
            let round = if run.parallel { "bench-par" } else { "bench" };
            let cfg = guest_config("bench", round, fs_mib, &disk, 2, run.queues);
            std::fs::write(dir.join(format!("bench-{}.cfg", run.tag)), cfg)
                .context("cannot write a bench configuration")?;
        }
    }
    let image = work.join("demo.img");
    std::fs::File::create(&image).and_then(|f| f.set_len(256 << 20)).context("cannot create demo.img")?;
    sys::run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "demo", "-d"]).arg(&dir).arg(&image))?;
    Ok(image)
}

/// The documented disk line (docs/xen.md): the guest's xvda is VDI `vdi`, served by parallaxd.
fn parallax_disk(vdi: &str) -> String {
    format!("vdev=xvda, access=w, backendtype=phy, script=block-parallax, target=parallax:{vdi}")
}

/// The comparison's disk: dom0's fourth virtio disk, served by the kernel's blkback.
const BLKBACK_DISK: &str = "format=raw, vdev=xvda, access=w, backendtype=phy, target=/dev/vdd";

/// The `xl` configuration of one PV guest in one round (`1`, `2` or `bench`) with `disk`,
/// `vcpus` vCPUs and, if given, blkfront capped at `queues` queues.
fn guest_config(name: &str, round: &str, fs_mib: u64, disk: &str, vcpus: u32, queues: Option<u32>) -> String {
    let writes = super::WRITES;
    let queues = queues.map(|q| format!(" parallax.queues={q}")).unwrap_or_default();
    format!(
        r#"name = "{name}"
type = "pv"
memory = 128
vcpus = {vcpus}
kernel = "/demo/vmlinuz"
ramdisk = "/demo/guest-initrd.gz"
extra = "console=hvc0 loglevel=4 parallax.name={name} parallax.round={round} parallax.fs_mib={fs_mib} parallax.writes={writes}{queues}"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
disk = [ "{disk}" ]
"#
    )
}
