//! The guest: a Debian kernel (downloaded, never installed), an initramfs with busybox and the
//! virtio/ext4 modules, and the golden ext4 root file system whose /sbin/init leaves a marker.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sys;

/// Modules the initramfs loads (dependencies from modules.dep come first; built-ins are skipped).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// The busybox binary of busybox-static.
const BUSYBOX: &str = "/bin/busybox";

/// The unpacked guest kernel.
pub struct Kernel {
    /// Kernel version, e.g. `6.1.0-57-amd64`.
    pub version: String,
    /// The bzImage to pass to `-kernel`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/VERSION` of the unpacked package.
    pub modules: PathBuf,
}

/// The current Debian kernel, downloaded and unpacked into `cache` once (reused afterwards).
pub fn fetch_kernel(cache: &Path) -> Result<Kernel> {
    let version = kernel_version()?;
    let root = cache.join(format!("kernel-{version}"));
    let k = Kernel {
        vmlinuz: root.join(format!("boot/vmlinuz-{version}")),
        modules: root.join(format!("lib/modules/{version}")),
        version: version.clone(),
    };
    if k.vmlinuz.is_file() && k.modules.join("modules.dep").is_file() {
        eprintln!("vm-demo: kernel {version} already unpacked in {}", root.display());
        return Ok(k);
    }
    if !k.vmlinuz.is_file() || !k.modules.join("modules.builtin").is_file() {
        unpack_kernel(cache, &root, &version)?;
    }
    if !k.vmlinuz.is_file() || !k.modules.join("modules.builtin").is_file() {
        bail!("linux-image-{version} has no boot/vmlinuz-{version} or lib/modules/{version}");
    }
    // The package ships no modules.dep (depmod makes it on install): make it in the unpacked tree.
    eprintln!("vm-demo: depmod -b {} {version}", root.display());
    sys::run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
    Ok(k)
}

/// `apt-get download linux-image-VERSION` into `cache`, `dpkg-deb -x` into `root`, remove the .deb.
fn unpack_kernel(cache: &Path, root: &Path, version: &str) -> Result<()> {
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let pkg = format!("linux-image-{version}");
    eprintln!("vm-demo: apt-get download {pkg} (into {})", cache.display());
    sys::run(Command::new("apt-get").args(["download", "-q", &pkg]).current_dir(cache))?;
    let deb = find_deb(cache, &pkg)?;
    eprintln!("vm-demo: dpkg-deb -x {} {}", deb.display(), root.display());
    sys::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    std::fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))
}

/// The version linux-image-amd64 depends on (`apt-cache depends linux-image-amd64`).
pub fn kernel_version() -> Result<String> {
    let text = sys::run_text(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .find(|v| v.ends_with("-amd64"))
        .map(str::to_string)
        .context("`apt-cache depends linux-image-amd64` names no linux-image-VERSION-amd64")
}

fn find_deb(dir: &Path, pkg: &str) -> Result<PathBuf> {
    let prefix = format!("{pkg}_");
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e.with_context(|| format!("cannot list {}", dir.display()))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(p);
        }
    }
    bail!("apt-get download left no {prefix}*.deb in {}", dir.display())
}

/// One module file from modules.dep and the modules it needs.
struct ModEntry {
    path: String,
    deps: Vec<String>,
}

/// `kernel/fs/ext4/ext4.ko.xz` -> `ext4` (dashes normalised to underscores, as modprobe does).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn parse_modules_dep(text: &str) -> HashMap<String, ModEntry> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else { continue };
        let deps = deps.split_whitespace().map(module_name).collect();
        map.insert(module_name(path), ModEntry { path: path.to_string(), deps });
    }
    map
}

/// Load order for `wanted`: each module after its dependencies; built-in ones dropped.
fn load_order(dep: &HashMap<String, ModEntry>, builtin: &HashSet<String>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(name: &str, dep: &HashMap<String, ModEntry>, seen: &mut HashSet<String>, out: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some(e) = dep.get(name) {
            for d in &e.deps {
                visit(d, dep, seen, out);
            }
            out.push(name.to_string());
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        if !dep.contains_key(*w) && !builtin.contains(*w) {
            bail!("module {w} is neither in modules.dep nor built in");
        }
        visit(w, dep, &mut seen, &mut out);
    }
    Ok(out)
}

fn builtin_modules(dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default().lines().map(module_name).collect()
}

/// Copies one module into `dest` as `NAME.ko`, decompressing .xz/.zst (busybox insmod reads neither).
fn copy_module(src: &Path, dest: &Path) -> Result<()> {
    let s = src.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => std::fs::copy(src, dest).map(|_| ()).with_context(|| format!("cannot copy {s}")),
        Some(t) => {
            let out = sys::run(Command::new(t).arg("-dc").arg(src))?;
            std::fs::write(dest, out.stdout).with_context(|| format!("cannot write {}", dest.display()))
        }
    }
}

pub fn write_exec(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn mkdirs(root: &Path, dirs: &[&str]) -> Result<()> {
    for d in dirs {
        let p = root.join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    Ok(())
}

/// The initramfs /init: load the modules, mount /dev/vda, switch_root to its /sbin/init.
const INITRAMFS_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
# A read-only disk (a snapshot) is mounted read-only; without replaying a journal, which
# would be a write.
if ! mount -t ext4 /dev/vda /newroot 2>/dev/null && ! mount -t ext4 -o ro,noload /dev/vda /newroot; then
    echo "VM-DEMO-FAIL: cannot mount /dev/vda"
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /sbin/init
"#;

/// The golden image's /sbin/init: leave a marker on first boot, report it on the next. A guest
/// named `snap-of-NAME` boots from a snapshot of NAME's clone, read-only: it finds NAME's
/// marker and no other, and cannot write.
pub const ROOT_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
NAME=
for a in $(cat /proc/cmdline); do
    case "$a" in parallax.name=*) NAME="${a#parallax.name=}" ;; esac
done
[ -n "$NAME" ] || NAME=$(hostname)
case "$NAME" in
snap-of-*)
    OF="${NAME#snap-of-}"
    ok=1
    [ "$(cat /sys/block/vda/ro)" = 1 ] || { echo "VM-DEMO-FAIL: /dev/vda is not read-only"; ok=; }
    [ "$(cat "/marker-$OF" 2>/dev/null)" = "$OF" ] || { echo "VM-DEMO-FAIL: /marker-$OF is not in the snapshot"; ok=; }
    others=$(ls / | grep '^marker-' | grep -v "^marker-$OF\$" | tr '\n' ' ')
    [ -z "$others" ] || { echo "VM-DEMO-FAIL: other markers in the snapshot: $others"; ok=; }
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then
        echo "VM-DEMO-FAIL: a write to the snapshot succeeded"; ok=
    fi
    [ -z "$ok" ] || echo "SNAPSHOT-READ-ONLY $NAME"
    poweroff -f
    ;;
esac
if [ -e "/marker-$NAME" ]; then
    echo "MARKER-FOUND $NAME"
else
    echo "$NAME" > "/marker-$NAME"
    sync
    echo "MARKER-WRITTEN $NAME"
fi
mount -o remount,ro /
sync
poweroff -f
"#;

/// Builds `initrd.gz` in `work` for `kernel` and returns its path.
pub fn build_initramfs(kernel: &Kernel, work: &Path) -> Result<PathBuf> {
    build_initramfs_with(kernel, work, MODULES, INITRAMFS_INIT, "initrd.gz")
}

/// Builds the initramfs `name` in `work`: busybox, `modules` of `kernel` (with what they need, in
/// load order, listed in /modules.order) and `init` as /init. Returns its path.
pub fn build_initramfs_with(kernel: &Kernel, work: &Path, modules: &[&str], init: &str, name: &str) -> Result<PathBuf> {
    let root = work.join(format!("{name}.d"));
    mkdirs(&root, &["bin", "proc", "sys", "dev", "newroot", "lib/modules"])?;
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).with_context(|| format!("cannot copy {BUSYBOX}"))?;
    let dep_text = std::fs::read_to_string(kernel.modules.join("modules.dep"))
        .with_context(|| format!("cannot read modules.dep of {}", kernel.version))?;
    let dep = parse_modules_dep(&dep_text);
    let order = load_order(&dep, &builtin_modules(&kernel.modules), modules)?;
    for m in &order {
        let e = dep.get(m).with_context(|| format!("module {m} vanished from modules.dep"))?;
        copy_module(&kernel.modules.join(&e.path), &root.join(format!("lib/modules/{m}.ko")))?;
    }
    eprintln!("xtask: {name} modules: {}", order.join(" "));
    std::fs::write(root.join("modules.order"), order.join("\n") + "\n").context("cannot write modules.order")?;
    write_exec(&root.join("init"), init)?;
    let out = work.join(name);
    sys::run(
        Command::new("sh")
            .args(["-c", "find . -print0 | cpio --null -o -H newc --quiet | gzip -6 > \"$1\"", "sh"])
            .arg(&out)
            .current_dir(&root),
    )?;
    Ok(out)
}

/// Builds the golden ext4 image of `size` bytes in `work` (mkfs.ext4 -d, no mount) with `init`
/// as its /sbin/init, and returns it.
pub fn build_rootfs(work: &Path, size: u64, init: &str) -> Result<PathBuf> {
    let root = work.join("rootfs");
    mkdirs(&root, &["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc"])?;
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).with_context(|| format!("cannot copy {BUSYBOX}"))?;
    let list = sys::run_text(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "sbin/init" && *a != "bin/busybox") {
        let link = root.join(applet);
        if !link.exists() {
            symlink("/bin/busybox", &link).with_context(|| format!("cannot create the symlink {}", link.display()))?;
        }
    }
    write_exec(&root.join("sbin/init"), init)?;
    std::fs::write(root.join("etc/hostname"), "golden\n").context("cannot write etc/hostname")?;
    let image = work.join("golden.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("cannot create {}", image.display()))?;
    sys::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "golden", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
            .arg(&root)
            .arg(&image),
    )?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_dependencies_first() {
        let dep = parse_modules_dep(
            "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/lib/crc16.ko.xz\n\
             kernel/fs/jbd2/jbd2.ko.xz:\nkernel/lib/crc16.ko.xz:\nkernel/drivers/block/virtio-blk.ko:\n",
        );
        let builtin: HashSet<String> = ["virtio".to_string()].into();
        let order = load_order(&dep, &builtin, &["virtio", "virtio_blk", "ext4"]).expect("order");
        assert_eq!(order, ["virtio_blk", "jbd2", "crc16", "ext4"]);
        assert!(load_order(&dep, &builtin, &["nope"]).is_err());
    }
}
