//! Operator operations on VDIs and snapshots: names, protection, rollback and resize, each
//! checked after a reopen of the store and with `check`.

mod common;

use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::MemBackend;
use common::*;
use vdi::{Source, VdiError};

fn read_all(reg: &Arc<vdi::Registry>, id: vdi::VdiId) -> Vec<u8> {
    let dev = reg.open_vdi(id, false).unwrap();
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn snapshot_names_are_unique_per_vdi_survive_a_reopen_and_go_with_the_snapshot() {
    let backend = Arc::new(MemBackend::new());
    let reg = new_store(backend.clone());
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let b = reg.create_vdi("b", Some(SIZE)).unwrap();
    let s1 = reg.snapshot_named(a, "before-upgrade").unwrap();
    // The same name on another VDI is fine; twice on one VDI is not.
    let s2 = reg.snapshot_named(b, "before-upgrade").unwrap();
    assert!(matches!(reg.snapshot_named(a, "before-upgrade"), Err(VdiError::SnapshotNameTaken { .. })));
    assert!(matches!(reg.snapshot_named(a, "12"), Err(VdiError::BadSnapshotName { .. })));
    assert!(matches!(reg.snapshot_named(a, "x@y"), Err(VdiError::BadSnapshotName { .. })));
    // Enough names to need a second name block (63 per block).
    let many: Vec<_> = (0..70).map(|i| reg.snapshot_named(a, &format!("n{i}")).unwrap()).collect();
    reg.name_snapshot(many[3], None).unwrap();
    reg.name_snapshot(many[4], Some("renamed")).unwrap();
    assert_clean(&reg);
    drop(reg);
    let reg = reopen(backend.clone());
    assert_eq!(reg.find_snapshot(a, "before-upgrade").unwrap(), s1);
    assert_eq!(reg.find_snapshot(b, "before-upgrade").unwrap(), s2);
    assert_eq!(reg.find_snapshot(a, "n69").unwrap(), many[69]);
    assert_eq!(reg.find_snapshot(a, "renamed").unwrap(), many[4]);
    assert!(matches!(reg.find_snapshot(a, "n3"), Err(VdiError::UnknownSnapshotName { .. })));
    assert_eq!(reg.snapshot_info(many[5]).unwrap().name.as_deref(), Some("n5"));
    // Deleting a named snapshot frees its name.
    reg.delete_snapshot(s1).unwrap();
    let again = reg.snapshot_named(a, "before-upgrade").unwrap();
    drop(reg);
    let reg = reopen(backend);
    assert_eq!(reg.find_snapshot(a, "before-upgrade").unwrap(), again);
    // Deleting the VDI releases its name blocks too.
    reg.delete_vdi(a).unwrap();
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
}

#[test]
fn a_protected_snapshot_and_its_vdi_cannot_be_deleted_until_unprotected() {
    let backend = Arc::new(MemBackend::new());
    let reg = new_store(backend.clone());
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let s = reg.snapshot(a).unwrap();
    reg.protect_snapshot(s, true).unwrap();
    drop(reg);
    let reg = reopen(backend);
    assert!(reg.snapshot_info(s).unwrap().protected);
    assert!(matches!(reg.delete_snapshot(s), Err(VdiError::Protected(x)) if x == s));
    assert!(matches!(reg.delete_vdi(a), Err(VdiError::Protected(_))));
    reg.protect_snapshot(s, false).unwrap();
    reg.delete_snapshot(s).unwrap();
    reg.delete_vdi(a).unwrap();
    assert_clean(&reg);
}

#[test]
fn rollback_restores_a_snapshot_and_keeps_the_vdi_id_and_its_other_snapshots() {
    let backend = Arc::new(MemBackend::new());
    let reg = new_store(backend.clone());
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let other = reg.create_vdi("other", Some(SIZE)).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(0, &vec![1u8; 8192], false).unwrap();
    let s1 = reg.snapshot(a).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(4096, &vec![2u8; 8192], false).unwrap();
    let s2 = reg.snapshot(a).unwrap();
    let after = read_all(&reg, a);
    reg.open_vdi(a, true).unwrap().write_at(0, &vec![3u8; SIZE as usize], false).unwrap();
    reg.rollback(a, s1).unwrap();
    let mut want = vec![0u8; SIZE as usize];
    want[..8192].fill(1);
    assert_eq!(read_all(&reg, a), want);
    assert_eq!(reg.diff(Source::Snapshot(s1), Source::Vdi(a)).unwrap(), vec![]);
    // Refused: another VDI's snapshot, and a VDI being written.
    let so = reg.snapshot(other).unwrap();
    assert!(matches!(reg.rollback(a, so), Err(VdiError::NotItsSnapshot { .. })));
    let w = reg.open_vdi(a, true).unwrap();
    assert!(matches!(reg.rollback(a, s2), Err(VdiError::Busy(_))));
    drop(w);
    // Roll forward to the later snapshot: it is still there.
    reg.rollback(a, s2).unwrap();
    drop(reg);
    let reg = reopen(backend);
    assert_eq!(read_all(&reg, a), after);
    reg.open_vdi(a, true).unwrap().write_at(0, &[7u8; 512], false).unwrap();
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
}

#[test]
fn resize_grows_with_zeros_and_shrinks_only_when_allowed() {
    let backend = Arc::new(MemBackend::new());
    let reg = new_store(backend.clone());
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(0, &vec![5u8; SIZE as usize], false).unwrap();
    let s = reg.snapshot(a).unwrap();
    assert!(matches!(reg.resize(a, 4096 + 512, false), Err(VdiError::ShrinkRefused { .. })));
    // Shrink to a size that ends inside a block, then grow again: what was cut off, including
    // the rest of the straddling block, reads as zeros.
    reg.resize(a, 4096 + 512, true).unwrap();
    assert_eq!(read_all(&reg, a), vec![5u8; 4096 + 512]);
    reg.resize(a, 2 * SIZE, false).unwrap();
    drop(reg);
    let reg = reopen(backend);
    let got = read_all(&reg, a);
    assert_eq!(got.len() as u64, 2 * SIZE);
    assert!(got[..4096 + 512].iter().all(|&b| b == 5));
    assert!(got[4096 + 512..].iter().all(|&b| b == 0), "bytes cut off by the shrink came back");
    // The snapshot kept everything.
    let snap = reg.open_snapshot(s).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    snap.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    drop(snap);
    assert!(matches!(reg.resize(a, 1000, true), Err(VdiError::BadSize(1000))));
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
}
