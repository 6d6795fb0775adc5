//! A store on a raw block device (a loop device over a file): created on a blank device,
//! filled until the device is full, reopened intact.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{BlockStore, CreateOptions, OpenOptions, StoreError};
use vdi::Registry;

struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("losetup (util-linux)");
        assert!(out.status.success(), "losetup needs root: {}", String::from_utf8_lossy(&out.stderr));
        Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn store_on_a_block_device_fills_up_cleanly_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file).unwrap().set_len(48 << 20).unwrap();
    let dev = Loop::attach(&file);
    assert!(blockstore::is_blank(&dev.0));
    let create = CreateOptions { journal_slot_blocks: 512, max_blocks: 0 };
    let open = OpenOptions::default();
    let written;
    {
        let store = BlockStore::open_path(&dev.0, &open, Some(&create)).expect("create on a blank device");
        let reg = Registry::open(Arc::new(store)).unwrap();
        let id = reg.create_vdi("big", Some(1 << 30)).unwrap();
        let disk = reg.open_vdi(id, true).unwrap();
        let chunk = vec![0x77u8; 1 << 20];
        let mut off = 0u64;
        let err = loop {
            match disk.write_at(off, &chunk, false) {
                Ok(()) => off += 1 << 20,
                Err(e) => break e,
            }
            assert!(off < 1 << 30, "a 48 MiB device cannot hold 1 GiB");
        };
        assert!(matches!(err, blockdev::DevError::NoSpace), "a full device says so: {err}");
        written = off;
        disk.flush().expect("the store still commits after running full");
        drop(disk);
        assert!(reg.check(false).unwrap().is_clean());
    }
    assert!(!blockstore::is_blank(&dev.0), "a store is not blank");
    // A device that holds a store is never formatted over.
    let store = BlockStore::open_path(&dev.0, &open, Some(&create)).expect("reopen");
    let reg = Registry::open(Arc::new(store)).unwrap();
    let disk = reg.open_vdi(vdi::VdiId(0), false).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    disk.read_at(written - (1 << 20), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    assert!(written > 30 << 20, "only {written} bytes fit in 48 MiB");
    // Not a store and not blank: refused by name.
    drop(disk);
    drop(reg);
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), b"something else").unwrap();
    assert!(matches!(
        BlockStore::open_path(other.path(), &open, Some(&create)).err(),
        Some(StoreError::NotAStore(_) | StoreError::Corrupt { .. } | StoreError::Damaged(_))
    ));
}

/// A store file on a small, really full file system: writes that find no space fail with
/// NoSpace, nothing committed is lost, and the store reopens clean.
#[test]
fn store_file_on_a_full_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let fs_img = dir.path().join("fs.img");
    std::fs::File::create(&fs_img).unwrap().set_len(96 << 20).unwrap();
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs_img).status().expect("mkfs.ext4");
    assert!(mkfs.success());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-o", "loop"]).arg(&fs_img).arg(&mnt).status().expect("mount");
    assert!(st.success(), "mount -o loop needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let path = mnt.join("blockstore.dat");
    let create = CreateOptions { journal_slot_blocks: 1024, max_blocks: 0 };
    let committed;
    {
        let store = BlockStore::open_path(&path, &OpenOptions::default(), Some(&create)).unwrap();
        let reg = Registry::open(Arc::new(store)).unwrap();
        let id = reg.create_vdi("big", Some(1 << 30)).unwrap();
        let disk = reg.open_vdi(id, true).unwrap();
        let chunk = vec![0x42u8; 1 << 20];
        let mut off = 0u64;
        let err = loop {
            match disk.write_at(off, &chunk, false) {
                Ok(()) => off += 1 << 20,
                Err(e) => break e,
            }
            if off.is_multiple_of(8 << 20) {
                disk.flush().unwrap();
            }
            assert!(off < 1 << 30);
        };
        assert!(matches!(err, blockdev::DevError::NoSpace), "the full file system is reported: {err}");
        // What was written before stays readable and commits.
        disk.flush().expect("commit after running full");
        committed = off;
        drop(disk);
        let report = reg.check(false).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    let store = BlockStore::open_path(&path, &OpenOptions::default(), None).expect("reopen");
    let reg = Registry::open(Arc::new(store)).unwrap();
    assert!(reg.check(false).unwrap().is_clean());
    let disk = reg.open_vdi(vdi::VdiId(0), false).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    disk.read_at(committed - (1 << 20), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    assert!(committed > 40 << 20, "only {committed} bytes before the 96 MiB file system was full");
}
