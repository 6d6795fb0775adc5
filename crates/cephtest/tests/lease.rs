//! The RADOS store's lease: one writer at a time, readers kept off while it writes, and a
//! writer that lost its lease fenced so nothing it still sends can land.

use blockstore::{BLOCK_SIZE, BlockStore, CreateOptions, OpenOptions, StoreError};
use rados::backend::HEADER_OBJECT;
use rados::lease::{LEASE_LOCK, OWNER_PREFIX};
use rados::{LockMode, LockSpec, RadosLocation, RadosOptions, open_store};

fn create(loc: &RadosLocation, opts: &RadosOptions) -> BlockStore {
    let c = CreateOptions { journal_slot_blocks: 64, max_blocks: 0 };
    let (s, created) = open_store(loc, opts, &OpenOptions::default(), Some(&c)).expect("create on RADOS");
    assert!(created);
    s
}

fn open(loc: &RadosLocation, opts: &RadosOptions, read_only: bool) -> blockstore::Result<BlockStore> {
    open_store(loc, opts, &OpenOptions { read_only, ..OpenOptions::default() }, None).map(|(s, created)| {
        assert!(!created);
        s
    })
}

/// Writes `byte` to a fresh data block and commits its allocation; returns the block.
fn write_block(s: &BlockStore, byte: u8) -> blockstore::BlockAddr {
    let mut t = s.begin().unwrap();
    let a = t.alloc_data().unwrap();
    t.finish().unwrap();
    s.write_data(a, 0, &[byte; BLOCK_SIZE]).unwrap();
    s.commit().unwrap();
    a
}

/// Takes the store's lease for `pool`'s client as host-a's writer would, for `duration`, and
/// never renews it: a writer that stopped (SIGSTOP, a partition, a crash) holding it.
fn lock_without_renewing(pool: &rados::Pool, duration: std::time::Duration) {
    let spec = LockSpec {
        name: LEASE_LOCK,
        mode: LockMode::Exclusive,
        cookie: "host-a/1",
        description: "host=host-a",
        duration,
    };
    pool.lock(HEADER_OBJECT, &spec, false).unwrap();
}

fn read_block(s: &BlockStore, a: blockstore::BlockAddr) -> u8 {
    let mut b = [0u8; BLOCK_SIZE];
    s.read_data(a, 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == b[0]));
    b[0]
}

#[test]
fn a_second_writer_or_a_reader_is_refused_while_the_lease_is_held() {
    let Some(cluster) = cephtest::cluster("a_second_writer_or_a_reader_is_refused_while_the_lease_is_held") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("lease", "host-a");
    let store = create(&loc, &a);
    let b = cluster.options("host-b");
    for read_only in [false, true] {
        match open(&loc, &b, read_only) {
            Err(StoreError::Locked { detail, .. }) => assert!(detail.contains("host host-a"), "{detail}"),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("host-b opened a store host-a writes (read_only {read_only})"),
        }
    }
    drop(store);
    // Released on close: the next host opens at once, and two readers share it.
    let r1 = open(&loc, &b, true).expect("reader after the writer closed");
    let r2 = open(&loc, &a, true).expect("a second reader");
    assert!(matches!(open(&loc, &b, false), Err(StoreError::Locked { .. })), "a writer beside readers");
    drop((r1, r2));
    open(&loc, &b, false).expect("a writer after the readers closed");
}

#[test]
fn a_taken_over_writer_is_fenced_and_its_committed_data_kept() {
    let Some(cluster) = cephtest::cluster("a_taken_over_writer_is_fenced_and_its_committed_data_kept") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("takeover", "host-a");
    let old = create(&loc, &a);
    let kept = write_block(&old, 0x11);
    // host-b takes the store over while host-a is still running (a partition, a stall).
    let pool = cluster.pool(loc.namespace.as_deref().unwrap());
    let fenced = rados::lease::take_over(&pool).expect("take over");
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert!(fenced[0].cookie.starts_with("host-a/"), "{fenced:?}");
    let b = cluster.options("host-b");
    let new = open(&loc, &b, false).expect("host-b opens after the takeover");
    assert_eq!(read_block(&new, kept), 0x11, "host-a's committed block");
    // host-a wakes and writes: the OSDs refuse it, and nothing of it reaches host-b's store.
    let err = old.write_data(kept, 0, &[0x22; BLOCK_SIZE]).expect_err("a fenced writer wrote");
    eprintln!("the fenced writer was refused, as it should be: {err}");
    assert_eq!(read_block(&new, kept), 0x11, "the fenced writer's data landed");
    let moved = write_block(&new, 0x33);
    drop(new);
    drop(old);
    let again = open(&loc, &cluster.options("host-c"), false).unwrap();
    assert_eq!((read_block(&again, kept), read_block(&again, moved)), (0x11, 0x33));
}

#[test]
fn a_writer_that_died_holding_the_lease_is_fenced_by_the_next_one() {
    let Some(cluster) = cephtest::cluster("a_writer_that_died_holding_the_lease_is_fenced_by_the_next_one") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("expiry", "host-a");
    drop(create(&loc, &a));
    // A writer that stopped renewing without letting go (SIGSTOP, a partition): its lock and
    // owner record stay, as Lease::acquire leaves them, and its connection is still alive.
    let ns = loc.namespace.clone().unwrap();
    let zombie = cluster.pool(&ns);
    let addr = zombie.cluster().address().unwrap();
    let lease = std::time::Duration::from_secs(3);
    lock_without_renewing(&zombie, lease);
    let record = format!("{OWNER_PREFIX}{}", zombie.cluster().instance_id());
    zombie.set_xattr(HEADER_OBJECT, &record, format!("host=host-a addr={addr}").as_bytes()).unwrap();
    let b = cluster.options("host-b");
    assert!(matches!(open(&loc, &b, false), Err(StoreError::Locked { .. })), "the lease is still running");
    // Wait the lease out (a fixed span: the OSD expires the lock, nothing to wait on here).
    std::thread::sleep(lease + std::time::Duration::from_millis(500));
    let store = open(&loc, &b, false).expect("host-b after the lease ran out");
    let kept = write_block(&store, 0x44);
    let err = zombie.write(&rados::backend::data_object(kept.byte_offset() / rados::backend::OBJECT_SIZE), 0, b"x");
    let errno = err.expect_err("the dead writer's client still writes").errno();
    assert_eq!(errno, Some(libc::ESHUTDOWN), "blocklisted (EBLOCKLISTED)");
    assert_eq!(read_block(&store, kept), 0x44);
}

#[test]
fn a_writer_recorded_late_beside_a_newer_one_is_fenced_too() {
    let Some(cluster) = cephtest::cluster("a_writer_recorded_late_beside_a_newer_one_is_fenced_too") else {
        return;
    };
    let (loc, b) = cluster.fresh_store("late-owner", "host-b");
    let holder = create(&loc, &b);
    // A writer that stalled between taking an (expired) lease and recording itself wakes and
    // records itself now, while host-b holds the store: it must not erase host-b's record.
    let ns = loc.namespace.clone().unwrap();
    let late = cluster.pool(&ns);
    let addr = late.cluster().address().unwrap();
    let record = format!("{OWNER_PREFIX}{}", late.cluster().instance_id());
    late.set_xattr(HEADER_OBJECT, &record, format!("host=host-z addr={addr}").as_bytes()).unwrap();
    let records = late.xattrs_with_prefix(HEADER_OBJECT, OWNER_PREFIX).unwrap();
    assert_eq!(records.len(), 2, "host-b's record and the late one: {records:?}");
    // host-b dies (taken over here), host-c opens: both earlier writers are fenced.
    let pool = cluster.pool(&ns);
    rados::lease::take_over(&pool).unwrap();
    let c = open(&loc, &cluster.options("host-c"), false).expect("host-c opens");
    let err = late.write("parallax.data.0000000000000000", 0, b"x").expect_err("the late writer still writes");
    assert_eq!(err.errno(), Some(libc::ESHUTDOWN), "blocklisted (EBLOCKLISTED): {err}");
    let err = holder.write_data(write_block(&c, 0x55), 0, &[0x66; BLOCK_SIZE]).expect_err("host-b still writes");
    eprintln!("host-b refused, as it should be: {err}");
    let records = pool.xattrs_with_prefix(HEADER_OBJECT, OWNER_PREFIX).unwrap();
    assert_eq!(records.len(), 1, "only host-c's record is left: {records:?}");
}

#[test]
fn a_creation_cut_short_is_made_again_and_leaves_nothing_behind() {
    let Some(cluster) = cephtest::cluster("a_creation_cut_short_is_made_again_and_leaves_nothing_behind") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("half-made", "host-a");
    // What a creation that died after growing the medium and writing some blocks leaves: the
    // header without its format, and data objects with bytes in them.
    let pool = cluster.pool(loc.namespace.as_deref().unwrap());
    pool.set_xattr(HEADER_OBJECT, "parallax.object_size", b"4194304").unwrap();
    pool.set_xattr(HEADER_OBJECT, "parallax.size", b"9000000").unwrap();
    for index in 0..3 {
        pool.write(&rados::backend::data_object(index), 0, &[0xEE; 8192]).unwrap();
    }
    assert!(open(&loc, &a, false).is_err(), "a half-made store is not a store");
    let store = create(&loc, &a);
    let block = write_block(&store, 0x77);
    drop(store);
    let again = open(&loc, &a, false).expect("the store made again opens");
    assert_eq!(read_block(&again, block), 0x77);
    let mut probe = [0u8; 8192];
    let n = pool.read(&rados::backend::data_object(2), 0, &mut probe).unwrap();
    assert!(probe[..n].iter().all(|&b| b != 0xEE), "a block of the unfinished creation survived");
}

/// `vdi --wait` on a RADOS store: a writer waiting behind the holder gets the store as soon as
/// the holder lets go — woken by the holder's notify, not by its own periodic look, which this
/// test puts two minutes away.
#[test]
fn a_waiting_writer_gets_the_store_when_the_holder_lets_go() {
    let Some(cluster) = cephtest::cluster("a_waiting_writer_gets_the_store_when_the_holder_lets_go") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("wait", "host-a");
    let holder = create(&loc, &a);
    let kept = write_block(&holder, 0x55);
    let pool = cluster.pool(loc.namespace.as_deref().unwrap());
    let look_again = std::time::Duration::from_secs(120);
    let (waiting_tx, waiting) = crossbeam_channel::bounded::<()>(1);
    let waiter = std::thread::spawn(move || {
        let t = rados::lease::acquire_waiting(pool, "host-b", LockMode::Exclusive, look_again, &mut |holder| {
            assert!(holder.contains("host host-a"), "{holder}");
            let _ = waiting_tx.try_send(());
        });
        (t, std::time::Instant::now())
    });
    waiting.recv().expect("the waiter found the lease taken");
    let released = std::time::Instant::now();
    drop(holder);
    let (lease, got) = waiter.join().unwrap();
    let lease = lease.expect("the waiter's lease");
    let waited = got - released;
    assert!(waited < look_again / 2, "the waiter took {waited:?}: it was not woken by the release");
    eprintln!("the waiter had the lease {waited:?} after the holder let go");
    drop(lease);
    let store = open(&loc, &cluster.options("host-b"), false).unwrap();
    assert_eq!(read_block(&store, kept), 0x55);
}

/// A holder that died without letting go sends no notify: the waiter looks again after a lease
/// time and gets the store once the dead holder's lock has run out.
#[test]
fn a_waiting_writer_gets_the_store_when_a_dead_holders_lease_runs_out() {
    let Some(cluster) = cephtest::cluster("a_waiting_writer_gets_the_store_when_a_dead_holders_lease_runs_out") else {
        return;
    };
    let (loc, a) = cluster.fresh_store("wait-expiry", "host-a");
    drop(create(&loc, &a));
    let ns = loc.namespace.clone().unwrap();
    let dead = cluster.pool(&ns);
    lock_without_renewing(&dead, std::time::Duration::from_secs(3));
    let mut refusals = 0;
    let lease = rados::lease::acquire_waiting(
        cluster.pool(&ns),
        "host-b",
        LockMode::Exclusive,
        std::time::Duration::from_secs(3),
        &mut |_| refusals += 1,
    )
    .expect("the lease once the dead holder's ran out");
    // One refusal, maybe two (the lease time races the lock's); a waiter spinning would count
    // thousands.
    assert!((1..=3).contains(&refusals), "found the lease taken {refusals} times");
    drop(lease);
}
