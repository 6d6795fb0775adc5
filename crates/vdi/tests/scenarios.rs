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

/// A damaged VDI record leaves that VDI out, reported, and the others usable.
#[test]
fn a_damaged_record_spares_the_other_vdis() {
    let mem = MemBackend::new();
    let reg = new_store(Arc::new(mem.clone()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let _b = reg.create_vdi("b", Some(SIZE)).unwrap();
    reg.open_vdi(a, true).unwrap().write_at(0, &[5u8; 4096], false).unwrap();
    reg.store().commit().unwrap();
    reg.create_vdi("c", Some(SIZE)).unwrap(); // the newest journal record no longer holds b's record
    drop(reg);
    let image = mem.durable_image();
    let record = image
        .chunks(4096)
        .position(|b| &b[0..4] == b"VDIR" && u64::from_le_bytes(b[16..24].try_into().unwrap()) == 1)
        .expect("VDI 1's record");
    mem.corrupt(record as u64 * 4096 + 200, &[0xee]);
    let reg = reopen(Arc::new(mem.clone()));
    let ids: Vec<u32> = reg.list().iter().map(|v| v.id.0).collect();
    assert_eq!(ids, vec![0, 2]);
    assert_eq!(reg.damaged().len(), 1);
    assert!(reg.damaged()[0].1.contains("checksum"), "{:?}", reg.damaged());
    let report = reg.check(true).unwrap();
    assert!(report.problems.iter().any(|p| p.to_string().contains("VDI 1")), "{:?}", report.problems);
    assert_eq!(report.repaired, 0, "nothing is repaired by guessing while a VDI is unreadable");
    assert_eq!(read_sectors(&reg.open_vdi(a, false).unwrap())[..8], [5u8; 8]);
}

/// `usage_of`: a snapshot's exclusive blocks are those the VDI has overwritten since (and only
/// those); a clone's writes are its own.
#[test]
fn usage_counts_mapped_and_exclusive_blocks() {
    use radix::Usage;
    use vdi::Source;
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    dev.write_at(0, &vec![1u8; 5 * 4096], false).unwrap();
    let s1 = reg.snapshot(a).unwrap();
    let usage =
        |srcs: &[Source]| -> Vec<Usage> { reg.usage_of(srcs).unwrap().into_iter().map(Option::unwrap).collect() };
    assert_eq!(usage(&[Source::Snapshot(s1), Source::Vdi(a)]), [Usage { mapped: 5, exclusive: 0 }; 2]);
    // The VDI overwrites two blocks and writes a new one: the snapshot alone keeps the two
    // old ones; the VDI alone holds its three.
    dev.write_at(4096, &vec![2u8; 2 * 4096], false).unwrap();
    dev.write_at(40 * 4096, &[3u8; 4096], false).unwrap();
    assert_eq!(
        usage(&[Source::Snapshot(s1), Source::Vdi(a)]),
        [Usage { mapped: 5, exclusive: 2 }, Usage { mapped: 6, exclusive: 3 }]
    );
    // A second snapshot shares everything with the VDI again.
    let s2 = reg.snapshot(a).unwrap();
    assert_eq!(usage(&[Source::Snapshot(s2)]), [Usage { mapped: 6, exclusive: 0 }]);
    let c = reg.clone_snapshot("c", s2).unwrap();
    reg.open_vdi(c, true).unwrap().write_at(0, &[4u8; 4096], false).unwrap();
    assert_eq!(usage(&[Source::Vdi(c)]), [Usage { mapped: 6, exclusive: 1 }]);
    assert_eq!(reg.usage_of(&[Source::Snapshot(vdi::SnapshotId(999))]).unwrap(), [None]);
    assert_clean(&reg);
}

/// Copy-on-write of one shared block by many writers at once: each writes its own 512-byte
/// sector of the same 4 KiB block right after a snapshot, so each must merge into the others'
/// copy rather than into the old contents. Every sector must land, every round.
#[test]
fn concurrent_partial_writes_to_one_shared_block_all_land() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = Arc::new(reg.open_vdi(a, true).unwrap());
    for round in 0..100u8 {
        reg.snapshot(a).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let writers: Vec<_> = (0..8u64)
            .map(|s| {
                let (dev, barrier) = (dev.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    // Block 3 of the VDI; sector s of it.
                    dev.write_at(3 * 4096 + s * 512, &[round.wrapping_add(s as u8 + 1); 512], false).unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut got = vec![0u8; 4096];
        dev.read_at(3 * 4096, &mut got).unwrap();
        for s in 0..8usize {
            let want = round.wrapping_add(s as u8 + 1);
            assert!(got[s * 512..(s + 1) * 512].iter().all(|&b| b == want), "round {round}: sector {s} was lost");
        }
    }
    assert_clean(&reg);
}

/// Deleting every snapshot of a full log block frees the block and forgets them (a 10 ms
/// schedule with retention must not grow the log forever), unless a VDI was cloned from one
/// of them; the tail block is never freed. Survives a reopen, and the store stays consistent.
#[test]
fn a_log_block_of_deleted_snapshots_is_freed() {
    use vdi::SNAPSHOTS_PER_LOG_BLOCK as PER;
    let mem = MemBackend::new();
    let reg = new_store(Arc::new(mem.clone()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    let mut ids = Vec::new();
    for i in 0..(3 * PER) {
        dev.write_at((i as u64 % 64) * 4096, &[i as u8; 4096], false).unwrap();
        ids.push(reg.snapshot(a).unwrap());
    }
    let used_before = reg.store().lock().space().allocated;
    // Block 1: all deleted -> freed. Block 2: all but one deleted, and that one has a clone ->
    // kept after its deletion too. Block 3 (the tail): all deleted -> kept.
    for &s in &ids[..PER] {
        reg.delete_snapshot(s).unwrap();
    }
    let clone = reg.clone_snapshot("c", ids[PER]).unwrap();
    for &s in &ids[PER..] {
        reg.delete_snapshot(s).unwrap();
    }
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    let listed: Vec<_> = reg.snapshots(a).unwrap().into_iter().map(|s| s.id).collect();
    assert!(!listed.contains(&ids[0]) && !listed.contains(&ids[PER - 1]), "block 1 forgotten");
    assert!(listed.contains(&ids[PER]) && listed.contains(&ids[2 * PER - 1]), "block 2 kept for its clone");
    assert!(listed.contains(&ids[3 * PER - 1]), "the tail block is kept");
    assert!(reg.snapshot_info(ids[0]).is_err());
    assert!(reg.store().lock().space().allocated < used_before);
    assert_clean(&reg);
    // All still so after a reopen.
    reg.store().commit().unwrap();
    drop(dev);
    drop(reg);
    let reg = reopen(Arc::new(mem));
    let listed: Vec<_> = reg.snapshots(a).unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(listed.len(), 2 * PER);
    assert!(reg.open_vdi(clone, false).is_ok());
    assert_clean(&reg);
}
