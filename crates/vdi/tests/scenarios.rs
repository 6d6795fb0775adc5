//! Hand-written scenarios: each names one behaviour of snapshots, clones and deletion.

mod common;

use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::MemBackend;
use common::*;

#[test]
fn clone_survives_deletion_of_its_snapshot_and_new_vdis_reuse_space() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(210 * 512, &vec![1u8; 39 * 512], false).unwrap();
    let s = reg.snapshot(a).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(0, &[2u8; 512], false).unwrap();
    let _b = reg.create_vdi("b", Some(SIZE)).unwrap();
    let c = reg.clone_snapshot("c", s).unwrap();
    let _d = reg.create_vdi("d", Some(SIZE)).unwrap();
    assert_clean(&reg);
    reg.delete_snapshot(s).unwrap();
    assert_clean(&reg);
    let _e = reg.create_vdi("e", Some(SIZE)).unwrap();
    let _f = reg.create_vdi("f", Some(SIZE)).unwrap();
    assert_clean(&reg);
    let got = read_sectors(&reg.open_vdi(c, false).unwrap());
    let mut want = vec![0u8; SECTORS];
    want[210..249].fill(1);
    assert_eq!(got, want, "clone");
    let got = read_sectors(&reg.open_vdi(a, false).unwrap());
    want[0] = 2;
    assert_eq!(got, want, "origin");
}

/// Found by the property test in CI: a discard covering the ends of two blocks and no whole
/// block must still zero the mapped one.
#[test]
fn discard_across_two_partial_blocks_zeroes_both() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    dev.write_at(504 * 512, &[1u8; 512], false).unwrap();
    // Block 62 (sectors 496..504) is unmapped; block 63 holds the written sector.
    dev.discard(497 * 512, 8 * 512).unwrap();
    let got = read_sectors(&dev);
    let want = vec![0u8; SECTORS];
    assert_eq!(got, want);
}
