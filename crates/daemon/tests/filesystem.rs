//! A real file system on a VDI: nbdfuse exposes the export as a file, mkfs.ext4 formats it,
//! the kernel loop-mounts it, files are written, and fsck finds it clean — twice, across a
//! daemon restart.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockdev::BlockDevice;
use common::*;

/// nbdfuse attached at a mount point; detached (and killed) when dropped, even on panic.
struct Fuse {
    mnt: std::path::PathBuf,
    child: Child,
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fuse_attach(uri: &str, mnt: &Path) -> Fuse {
    let file = mnt.join("nbd");
    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(uri)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdfuse");
    let fuse = Fuse { mnt: mnt.to_path_buf(), child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "nbdfuse did not expose the export");
        std::thread::sleep(Duration::from_millis(50));
    }
    fuse
}

fn fuse_detach(mnt: &Path, mut fuse: Fuse) {
    run_ok("umount", &[mnt.to_str().unwrap()]);
    let _ = fuse.child.wait();
}

#[test]
fn ext4_on_nbdfuse_survives_fsck_and_restart() {
    for p in ["nbdfuse", "mkfs.ext4", "fsck.ext4", "mount", "umount"] {
        need(p);
    }
    let (dir, store) = Daemon::prepare(128 * MIB);
    let d = Daemon::start(dir, store, &[]);
    let mnt = d.dir.path().join("mnt");
    let fs = d.dir.path().join("fs");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&fs).unwrap();
    let (img, fsd) = (mnt.join("nbd"), fs.to_str().unwrap().to_string());
    let img_s = img.to_str().unwrap().to_string();
    let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();

    let fuse = fuse_attach(&d.uri("disk"), &mnt);
    run_ok("mkfs.ext4", &["-q", "-F", &img_s]);
    run_ok("mount", &["-o", "loop", &img_s, &fsd]);
    std::fs::write(fs.join("payload.bin"), &payload).unwrap();
    std::fs::create_dir(fs.join("dir")).unwrap();
    for i in 0..50 {
        std::fs::write(fs.join("dir").join(format!("f{i}")), format!("file {i}\n").repeat(i + 1)).unwrap();
    }
    run_ok("umount", &[&fsd]);
    run_ok("fsck.ext4", &["-n", "-f", &img_s]);
    fuse_detach(&mnt, fuse);

    let (code, dir, store) = d.stop();
    assert_eq!(code, 0);
    // The store itself holds an ext4 file system now.
    with_registry(&store, |r| {
        let mut sb = [0u8; 2];
        r.open_vdi(vdi::VdiId(0), false).unwrap().read_at(1024 + 56, &mut sb).unwrap();
        assert_eq!(u16::from_le_bytes(sb), 0xEF53, "ext4 magic in the VDI");
        assert!(r.check(false).unwrap().is_clean());
    });

    // Serve it again: the files are all there.
    let d = Daemon::start(dir, store, &[]);
    let fuse = fuse_attach(&d.uri("disk"), &mnt);
    run_ok("fsck.ext4", &["-n", "-f", &img_s]);
    run_ok("mount", &["-o", "loop,ro", &img_s, &fsd]);
    let back = std::fs::read(fs.join("payload.bin"));
    let small = std::fs::read_to_string(fs.join("dir").join("f49"));
    run_ok("umount", &[&fsd]);
    fuse_detach(&mnt, fuse);
    assert!(back.expect("payload") == payload, "payload changed");
    assert_eq!(small.expect("f49"), "file 49\n".repeat(50));
    assert_eq!(d.stop().0, 0);
}
