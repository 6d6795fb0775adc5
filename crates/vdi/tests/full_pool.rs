//! A RADOS pool that fills up (its quota reached) while VMs write: the write that needs new
//! space gets "no space" at once, every flush still commits, blocks already written are
//! rewritten in place, nothing acknowledged is lost, and once the pool has room the same open
//! store takes new data again. (librados by default holds such a write until the op timeout,
//! 60 s; a commit waiting that way failed and poisoned the store until it was reopened.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{BlockDevice, DevError};
use blockstore::{CreateOptions, OpenOptions};
use rados::RadosLocation;
use vdi::Registry;

const BLOCK: usize = 4096;
/// The quota: a few data objects beyond what the store's journal and first group take.
const QUOTA: u64 = 16 << 20;
/// Writes past the quota before the test calls the pool one that never fills.
const MAX_FILL: u64 = 1 << 30;

fn pattern(vdi: u8, block: u64) -> Vec<u8> {
    let mut b = vec![vdi; BLOCK];
    b[..8].copy_from_slice(&block.to_le_bytes());
    b
}

fn open(loc: &RadosLocation, opts: &rados::RadosOptions, create: bool) -> Arc<Registry> {
    let c = CreateOptions { journal_slot_blocks: 64, max_blocks: 0 };
    let (store, created) =
        rados::open_store(loc, opts, &OpenOptions::default(), create.then_some(&c)).expect("opening the store");
    assert_eq!(created, create);
    Registry::open(Arc::new(store)).expect("registry")
}

fn read(d: &dyn BlockDevice, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    d.read_at(block * BLOCK as u64, &mut b).expect("read");
    b
}

#[test]
fn a_full_pool_refuses_new_space_at_once_and_the_store_goes_on() {
    let Some(cluster) = cephtest::cluster("a_full_pool_refuses_new_space_at_once_and_the_store_goes_on") else {
        return;
    };
    let pool = cluster.scratch_pool("full");
    let loc = RadosLocation { pool: pool.name.clone(), namespace: None };
    let opts = cluster.options("host-full");
    let reg = open(&loc, &opts, true);
    let a = reg.create_vdi("filler", Some(4 << 30)).unwrap();
    let b = reg.create_vdi("bystander", Some(1 << 30)).unwrap();
    let da = reg.open_vdi(a, true).unwrap();
    let db = reg.open_vdi(b, true).unwrap();
    db.write_at(0, &pattern(0xbb, 0), false).unwrap();
    db.flush().unwrap();

    pool.set_quota_bytes(QUOTA);
    // Fill `filler` until the pool is marked full; flush every 64 blocks.
    let mut written = 0u64;
    let refused = loop {
        assert!(written * (BLOCK as u64) < MAX_FILL, "the pool never filled: {written} blocks written");
        match da.write_at(written * BLOCK as u64, &pattern(0xaa, written), false) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        if written.is_multiple_of(64) {
            da.flush().expect("a flush while the pool fills");
        }
    };
    assert!(matches!(refused, DevError::NoSpace), "a write to a full pool: expected no space, got {refused:?}");
    eprintln!("the pool filled after {written} blocks ({} MiB)", (written * BLOCK as u64) >> 20);

    // The store goes on: the flush commits what was written, blocks already written (and not
    // shared) take new data in place, a snapshot is taken or refused for space (never
    // anything else).
    da.flush().expect("a flush on a full pool");
    db.write_at(0, &pattern(0xbc, 0), false).expect("rewriting a written block on a full pool");
    da.write_at(0, &pattern(0xab, 0), false).expect("rewriting a written block on a full pool");
    db.flush().expect("a flush on a full pool");
    da.flush().expect("a flush on a full pool");
    match reg.snapshot(b) {
        Ok(_) | Err(vdi::VdiError::Store(blockstore::StoreError::NoSpace { .. })) => {}
        Err(e) => panic!("a snapshot on a full pool: {e}"),
    }
    db.flush().expect("a flush on a full pool");
    assert_eq!(read(&db, 0), pattern(0xbc, 0));
    assert_eq!(read(&da, 0), pattern(0xab, 0));
    for i in 1..written {
        assert_eq!(read(&da, i), pattern(0xaa, i), "block {i}");
    }

    // Room again: the same open store takes new data once the monitors clear the flag.
    pool.set_quota_bytes(0);
    let t0 = Instant::now();
    loop {
        match da.write_at(written * BLOCK as u64, &pattern(0xaa, written), false) {
            Ok(()) => break,
            Err(DevError::NoSpace) if t0.elapsed() < Duration::from_secs(120) => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(e) => panic!("a write after the quota was lifted: {e:?}"),
        }
    }
    written += 1;
    da.flush().expect("a flush after the quota was lifted");

    // Everything acknowledged is there after a reopen, and the store checks clean.
    drop((da, db));
    drop(reg);
    let reg = open(&loc, &opts, false);
    let report = reg.check(false).expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let da = reg.open_vdi(a, false).unwrap();
    let db = reg.open_vdi(b, false).unwrap();
    assert_eq!(read(&db, 0), pattern(0xbc, 0));
    assert_eq!(read(&da, 0), pattern(0xab, 0));
    for i in 1..written {
        assert_eq!(read(&da, i), pattern(0xaa, i), "block {i} after reopening");
    }
}
