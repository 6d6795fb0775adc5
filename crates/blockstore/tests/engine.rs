//! Unit tests of the journal, allocator, cache and transactions through the public API; those
//! that need no memory-only fault injection run on both media (`on_both!`): in memory and in
//! RADOS.

use std::sync::Arc;

use blockstore::format::{block_crc, seal_meta, verify_meta};
use blockstore::{
    BLOCK_SIZE, Block, BlockAddr, BlockStore, CrashMode, CreateOptions, DerivedState, MemBackend, Meta, MetaKind,
    OpenOptions, StoreError,
};

static TEST_KIND: MetaKind =
    MetaKind { name: "test", seal: |b, a| seal_meta(b, 0x5453_4554, a), verify: |b, a| verify_meta(b, 0x5453_4554, a) };

fn store(mem: &MemBackend, journal: u64, cache: usize) -> BlockStore {
    let create = CreateOptions { journal_slot_blocks: journal, max_blocks: 0 };
    BlockStore::create(Arc::new(mem.clone()), &create, &OpenOptions { cache_blocks: cache, ..OpenOptions::default() })
        .unwrap()
}

fn reopen(mem: &MemBackend) -> BlockStore {
    BlockStore::open(Arc::new(mem.clone()), &OpenOptions::default()).unwrap()
}

/// Where a test's store lives: the same engine tests run on both media.
enum Medium {
    /// In memory; a crash drops every unsynced write.
    Memory(MemBackend),
    /// In a RADOS namespace of the test cluster (`cargo xtask test` starts it); a crash is the
    /// process dying with its lease held: the next opener fences it and keeps every completed
    /// write, which RADOS made durable.
    Rados(cephtest::TestCluster, rados::RadosLocation, rados::RadosOptions),
}

impl Medium {
    fn rados(test: &str) -> Option<Medium> {
        let cluster = cephtest::cluster(test)?;
        let (loc, opts) = cluster.fresh_store("engine", "test-host");
        Some(Medium::Rados(cluster, loc, opts))
    }

    fn store(&self, journal: u64, cache: usize) -> BlockStore {
        match self {
            Medium::Memory(mem) => store(mem, journal, cache),
            Medium::Rados(_, loc, opts) => {
                let create = CreateOptions { journal_slot_blocks: journal, max_blocks: 0 };
                let open = OpenOptions { cache_blocks: cache, ..OpenOptions::default() };
                rados::open_store(loc, opts, &open, Some(&create)).unwrap().0
            }
        }
    }

    fn crash(&self) {
        match self {
            Medium::Memory(mem) => mem.crash(CrashMode::DropAll),
            Medium::Rados(cluster, loc, _) => {
                let pool = cluster.pool(loc.namespace.as_deref().unwrap_or_default());
                rados::lease::take_over(&pool).unwrap();
            }
        }
    }

    fn reopen(&self) -> BlockStore {
        match self {
            Medium::Memory(mem) => reopen(mem),
            Medium::Rados(_, loc, opts) => rados::open_store(loc, opts, &OpenOptions::default(), None).unwrap().0,
        }
    }
}

/// A test run twice: `NAME::memory` and `NAME::rados`.
macro_rules! on_both {
    ($name:ident, |$m:ident| $body:block) => {
        mod $name {
            use super::*;

            #[test]
            fn memory() {
                let $m = Medium::Memory(MemBackend::new());
                $body
            }

            #[test]
            fn rados() {
                let Some($m) = Medium::rados(concat!(stringify!($name), "::rados")) else { return };
                $body
            }
        }
    };
}

/// Allocates a metadata block holding `byte` at offset 100, in its own transaction.
fn new_block(s: &BlockStore, byte: u8) -> BlockAddr {
    let mut t = s.begin().unwrap();
    let a = t.alloc_meta(&TEST_KIND).unwrap();
    t.write(a, &TEST_KIND).unwrap()[100] = byte;
    t.finish().unwrap();
    a
}

fn byte_at(s: &BlockStore, a: BlockAddr) -> u8 {
    s.lock().read(a, &TEST_KIND).unwrap()[100]
}

on_both!(changes_outside_a_transaction_are_refused, |m| {
    let s = m.store(64, 256);
    assert!(matches!(s.lock().alloc_meta(&TEST_KIND), Err(StoreError::NoTransaction)));
    assert!(matches!(s.lock().set_user(3, 1), Err(StoreError::NoTransaction)));
});

#[test]
fn recovery_replays_the_older_record_too() {
    // Commit N changes block a, commit N+1 changes block b. If a's home write of N were lost
    // (version 1 did not sync it before record N+1), replaying only N+1 would lose it.
    // (a is made in a commit of its own first: a block new in a commit goes home before its
    // record instead of into it, so only a change to a live block is in a record.)
    let mem = MemBackend::new();
    let s = store(&mem, 64, 256);
    let a = new_block(&s, 1);
    s.commit().unwrap();
    let mut t = s.begin().unwrap();
    t.write(a, &TEST_KIND).unwrap()[100] = 3;
    t.finish().unwrap();
    s.commit().unwrap();
    let b = new_block(&s, 2);
    s.commit().unwrap();
    drop(s);
    mem.corrupt(a.byte_offset(), &[0u8; BLOCK_SIZE]);
    let s = reopen(&mem);
    assert_eq!(byte_at(&s, a), 3, "the older record restored a's home");
    assert_eq!(byte_at(&s, b), 2);
    assert_eq!(
        s.recovery().blocks_replayed,
        2 + 2,
        "both records (a and the superblock; b's refcounts and the superblock)"
    );
}

#[test]
fn a_block_freed_by_set_refcount_leaves_no_image_in_the_record() {
    // A freed block's changes are dropped (format.md §5, step 1), however it was freed: were
    // its image in a record, recovery could replay it over the block reused as a new one.
    let mem = MemBackend::new();
    let s = store(&mem, 64, 256);
    let x = new_block(&s, 1);
    s.commit().unwrap();
    let mut t = s.begin().unwrap();
    t.write(x, &TEST_KIND).unwrap()[100] = 5;
    t.set_refcount(x, 0).unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    mem.crash(CrashMode::DropAll);
    let s = reopen(&mem);
    assert_eq!(s.recovery().blocks_replayed, 2 + 2, "both records: count block and superblock each, no image of x");
}

#[test]
fn a_new_block_goes_home_before_its_record_and_not_into_it() {
    // A block allocated since the last commit is free in the committed state: the commit
    // writes it home before its record (so it is durable when the record is) and journals
    // only the blocks that were live — here its count block and the superblock.
    let mem = MemBackend::new();
    let s = store(&mem, 64, 256);
    let a = new_block(&s, 7);
    assert_eq!(s.commit().unwrap().blocks, 2, "the new block and its count block were written");
    mem.crash(CrashMode::DropAll);
    let s = reopen(&mem);
    assert_eq!(s.recovery().blocks_replayed, 2, "the record held the count block and the superblock only");
    assert_eq!(byte_at(&s, a), 7, "the new block was durable with its record");
}

on_both!(a_lost_group_growth_cannot_outlive_its_record, |m| {
    // The file growth of a new group is synced before the record that uses it: a power cut
    // right after the commit keeps both.
    let s = m.store(64, 256);
    for i in 0..1500 {
        let mut t = s.begin().unwrap();
        t.alloc_run(1).unwrap();
        t.finish().unwrap();
        if i % 200 == 0 {
            s.commit().unwrap();
        }
    }
    s.commit().unwrap();
    let groups = s.lock().superblock().groups;
    assert!(groups >= 2);
    m.crash();
    let s = m.reopen();
    assert_eq!(s.lock().superblock().groups, groups);
});

on_both!(reserved_blocks_are_not_handed_out_and_change_no_count, |m| {
    let s = m.store(64, 256);
    let mut t = s.begin().unwrap();
    let (first, n) = t.reserve_run(8).unwrap();
    t.finish().unwrap();
    assert_eq!(n, 8);
    assert_eq!(s.lock().refcount(first).unwrap(), 0, "a reservation changes no count");
    let mut t = s.begin().unwrap();
    let (other, _) = t.alloc_run(4).unwrap();
    assert!(other.0 >= first.0 + 8 || other.0 + 4 <= first.0, "reserved blocks were handed out");
    t.claim(first).unwrap();
    assert!(t.claim(BlockAddr(other.0)).is_err(), "only reserved blocks can be claimed");
    drop(t); // rolled back: first is reserved again, other free again
    let mut t = s.begin().unwrap();
    t.claim(first).unwrap();
    assert_eq!(t.refcount(first).unwrap(), 1);
    t.finish().unwrap();
    s.lock().unreserve(BlockAddr(first.0 + 1), 7);
    s.commit().unwrap();
    // A power cut loses nothing that was only reserved.
    m.crash();
    let s = m.reopen();
    assert_eq!(s.lock().refcount(first).unwrap(), 1);
    assert_eq!(s.lock().refcount(BlockAddr(first.0 + 1)).unwrap(), 0);
});

on_both!(a_freed_block_is_not_reused_before_its_free_is_committed, |m| {
    let s = m.store(64, 256);
    let a = new_block(&s, 7);
    s.commit().unwrap();
    let mut t = s.begin().unwrap();
    assert_eq!(t.decref(a).unwrap(), 0);
    assert!(t.is_pending_free(a));
    let (b, _) = t.alloc_run(1).unwrap();
    assert_ne!(a, b, "a block freed in this generation was handed out again");
    t.finish().unwrap();
    s.commit().unwrap();
    assert!(!s.lock().is_pending_free(a));
});

on_both!(dirty_blocks_survive_a_full_cache, |m| {
    // A 64-block cache and 300 changed blocks: dirty blocks are never evicted, clean ones are
    // and read back verified.
    let s = m.store(1024, 64);
    let blocks: Vec<BlockAddr> = (0..300).map(|i| new_block(&s, (i % 250) as u8)).collect();
    for (i, a) in blocks.iter().enumerate() {
        assert_eq!(byte_at(&s, *a), (i % 250) as u8);
    }
    s.commit().unwrap();
    for (i, a) in blocks.iter().enumerate().rev() {
        assert_eq!(byte_at(&s, *a), (i % 250) as u8, "after eviction and reload");
    }
});

on_both!(a_transaction_that_outgrows_the_journal_is_refused_and_rolled_back, |m| {
    let s = m.store(16, 256);
    let before = s.lock().space();
    let mut t = s.begin().unwrap();
    let capacity = t.journal_capacity();
    for _ in 0..capacity + 2 {
        t.alloc_meta(&TEST_KIND).unwrap();
    }
    assert!(matches!(t.finish(), Err(StoreError::TransactionTooLarge { .. })));
    assert_eq!(s.lock().space(), before);
    assert_eq!(s.lock().dirty_blocks(), 0);
    // The store still commits.
    new_block(&s, 3);
    s.commit().unwrap();
});

on_both!(group_commit_shares_commits_between_concurrent_flushes, |m| {
    let s = Arc::new(m.store(1024, 4096));
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    new_block(&s, i.wrapping_add(k));
                    s.commit().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let generation = s.lock().superblock().generation;
    eprintln!("200 flushes of 4 threads took {generation} commits");
    assert!(generation <= 200);
    m.crash();
    let s = m.reopen();
    assert_eq!(s.lock().space().allocated, 200, "every finished transaction is durable");
});

/// Stores of every older version this build reads are upgraded in place, once, durably.
#[test]
fn older_versions_are_upgraded() {
    for old in blockstore::format::OLDEST_FORMAT_VERSION..blockstore::format::FORMAT_VERSION {
        let mem = MemBackend::new();
        let s = store(&mem, 64, 256);
        let a = new_block(&s, 9);
        s.commit().unwrap();
        s.sync_data().unwrap(); // makes the home writes durable
        drop(s);
        // Rewrite both superblock copies as the old version.
        let image = mem.durable_image();
        for copy in 0..2usize {
            let mut b: Block = image[copy * BLOCK_SIZE..(copy + 1) * BLOCK_SIZE].try_into().unwrap();
            b[8..12].copy_from_slice(&old.to_le_bytes());
            let crc = block_crc(&b, 16);
            b[16..20].copy_from_slice(&crc.to_le_bytes());
            mem.corrupt((copy * BLOCK_SIZE) as u64, &b);
        }
        // And no journal record (whose superblock image would say the current version).
        for header in [2u64, 2 + 64] {
            mem.corrupt(header * BLOCK_SIZE as u64, &[0u8; BLOCK_SIZE]);
        }
        let s = reopen(&mem);
        assert_eq!(s.recovery().upgraded_from, Some(old));
        assert_eq!(byte_at(&s, a), 9);
        drop(s);
        let s = reopen(&mem);
        assert_eq!(s.recovery().upgraded_from, None, "upgraded once, durably (from {old})");
        assert_eq!(s.lock().superblock().version, blockstore::format::FORMAT_VERSION);
    }
}

on_both!(a_frozen_view_keeps_the_metadata_of_its_instant, |m| {
    use blockstore::MetaRead;
    let s = m.store(64, 64);
    let kept = new_block(&s, 1);
    let freed = new_block(&s, 2);
    s.commit().unwrap();
    // Reopened: nothing cached, so the view reads the medium and `freed` is freed uncached.
    drop(s);
    let s = m.reopen();
    // Changed but not committed at the view's instant: only in memory.
    let dirty = new_block(&s, 3);
    let mut view = s.freeze().unwrap();
    // After the view: change one block, free two, make it all durable.
    let mut t = s.begin().unwrap();
    t.write(kept, &TEST_KIND).unwrap()[100] = 9;
    t.decref(freed).unwrap();
    t.decref(dirty).unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    s.commit().unwrap();
    // Allocate and overwrite data until the allocator has wrapped around the store twice.
    let groups = s.lock().superblock().groups;
    while s.lock().superblock().groups < groups + 2 {
        let mut t = s.begin().unwrap();
        let (first, n) = t.alloc_run(256).unwrap();
        t.finish().unwrap();
        s.commit().unwrap();
        assert!(!(first.0..first.0 + n).contains(&freed.0), "a block freed while a view is open is reused");
        s.write_data(first, 0, &vec![0xEE; n as usize * BLOCK_SIZE]).unwrap();
    }
    // A block born after the view and freed again is not the view's: not held.
    let born = new_block(&s, 5);
    s.commit().unwrap();
    let mut t = s.begin().unwrap();
    t.decref(born).unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    s.commit().unwrap();
    assert_eq!(byte_at(&s, kept), 9, "the live store sees the change");
    // The view still sees its instant: old contents, the freed block, the old counts.
    assert_eq!(view.read(kept, &TEST_KIND).unwrap()[100], 1);
    assert_eq!(view.read(freed, &TEST_KIND).unwrap()[100], 2);
    assert_eq!(view.read(dirty, &TEST_KIND).unwrap()[100], 3, "never written home, kept when freed");
    assert_eq!(view.refcount(freed).unwrap(), 1);
    assert_eq!(view.all_refcounts().unwrap().len(), 3);
    assert_eq!(view.superblock().allocated, 3);
    view.still_valid().unwrap();
    assert_eq!(s.lock().space().pending_free, 2, "the freed blocks are held for the view");
    drop(view);
    assert_eq!(s.lock().space().pending_free, 0, "closed: the held block is free again");
    s.freeze().unwrap();
});

on_both!(a_frozen_view_past_its_limit_is_given_up_not_trusted, |m| {
    use blockstore::MetaRead;
    let s = m.store(64, 256);
    let blocks: Vec<BlockAddr> = (0..4).map(|i| new_block(&s, i)).collect();
    s.commit().unwrap();
    let mut view = s.freeze_with_limit(2).unwrap();
    let mut t = s.begin().unwrap();
    for &b in &blocks {
        t.write(b, &TEST_KIND).unwrap()[100] = 0xAA;
    }
    t.finish().unwrap();
    assert!(matches!(view.read(blocks[0], &TEST_KIND), Err(StoreError::ViewOverrun)));
    assert!(matches!(view.still_valid(), Err(StoreError::ViewOverrun)));
    drop(view);
    s.freeze().unwrap().still_valid().unwrap();
});

#[test]
fn a_write_that_needs_the_space_a_view_holds_gives_the_view_up() {
    let probe = store(&MemBackend::new(), 64, 256);
    let groups_start = probe.lock().superblock().groups_start;
    // Room for exactly one allocation group (1 020 blocks), never more.
    let mem = MemBackend::new();
    let create = CreateOptions { journal_slot_blocks: 64, max_blocks: groups_start + blockstore::format::GROUP_BLOCKS };
    let s = BlockStore::create(Arc::new(mem.clone()), &create, &OpenOptions::default()).unwrap();
    let alloc = |n: u64| -> Vec<BlockAddr> {
        let mut got = Vec::new();
        while (got.len() as u64) < n {
            let mut t = s.begin().unwrap();
            let (first, k) = t.alloc_run(n - got.len() as u64).unwrap();
            t.finish().unwrap();
            s.commit().unwrap();
            got.extend((first.0..first.0 + k).map(BlockAddr));
        }
        got
    };
    let used = alloc(1000);
    let view = s.freeze().unwrap();
    for chunk in used[..500].chunks(40) {
        let mut t = s.begin().unwrap();
        for &b in chunk {
            t.decref(b).unwrap();
        }
        t.finish().unwrap();
        s.commit().unwrap();
    }
    s.commit().unwrap();
    assert_eq!(s.lock().space().pending_free, 500, "held for the view");
    // 400 blocks fit only in what the view holds: the write wins, the view is given up.
    assert_eq!(alloc(400).len(), 400);
    assert!(matches!(view.still_valid(), Err(StoreError::ViewOverrun)));
}

/// A medium that counts syncs and write requests.
struct CountingSyncs {
    inner: MemBackend,
    syncs: std::sync::atomic::AtomicUsize,
    writes: std::sync::atomic::AtomicUsize,
}

impl blockstore::Backend for CountingSyncs {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.write_at(offset, data)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.sync()
    }
    fn extend(&self, len: u64) -> std::io::Result<()> {
        self.inner.extend(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
}

#[test]
fn a_flush_syncs_only_when_something_was_written_since_the_last_sync() {
    let medium =
        Arc::new(CountingSyncs { inner: MemBackend::new(), syncs: Default::default(), writes: Default::default() });
    let s = BlockStore::create(medium.clone(), &CreateOptions::default(), &OpenOptions::default()).unwrap();
    let syncs = || medium.syncs.load(std::sync::atomic::Ordering::SeqCst);
    let mut t = s.begin().unwrap();
    let data = t.alloc_data().unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    let before = syncs();
    s.commit().unwrap();
    s.commit().unwrap();
    assert_eq!(syncs(), before, "nothing new: no sync");
    s.write_data(data, 0, &[7; BLOCK_SIZE]).unwrap();
    s.commit().unwrap();
    assert_eq!(syncs(), before + 1, "a completed data write is synced by the next flush");
    s.commit().unwrap();
    assert_eq!(syncs(), before + 1);
    let mut t = s.begin().unwrap();
    t.set_user(5, 1).unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    assert_eq!(syncs(), before + 3, "a metadata change: sync, record, sync");
}

on_both!(views_taken_at_different_instants_each_keep_their_own, |m| {
    use blockstore::MetaRead;
    let s = m.store(64, 256);
    let a = new_block(&s, 1);
    let gone = new_block(&s, 7);
    s.commit().unwrap();
    let set = |v: u8| {
        let mut t = s.begin().unwrap();
        t.write(a, &TEST_KIND).unwrap()[100] = v;
        t.finish().unwrap();
        s.commit().unwrap();
    };
    let mut first = s.freeze().unwrap();
    set(2);
    let mut second = s.freeze().unwrap();
    set(3);
    let mut t = s.begin().unwrap();
    t.decref(gone).unwrap();
    t.finish().unwrap();
    s.commit().unwrap();
    s.commit().unwrap();
    assert_eq!(first.read(a, &TEST_KIND).unwrap()[100], 1);
    assert_eq!(second.read(a, &TEST_KIND).unwrap()[100], 2);
    assert_eq!(byte_at(&s, a), 3);
    drop(first);
    assert_eq!(second.read(a, &TEST_KIND).unwrap()[100], 2, "closing one view leaves the other");
    assert_eq!(second.read(gone, &TEST_KIND).unwrap()[100], 7);
    assert_eq!(s.lock().space().pending_free, 1, "still held for the second view");
    drop(second);
    assert_eq!(s.lock().space().pending_free, 0);
    // Eight at once; a ninth waits until one closes.
    let mut many: Vec<_> = (0..8).map(|_| s.freeze().unwrap()).collect();
    let (got_tx, got) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let ninth = s.freeze().unwrap();
            got_tx.send(()).unwrap();
            drop(ninth);
        });
        assert!(got.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "a ninth view waits");
        many.pop();
        got.recv_timeout(std::time::Duration::from_secs(60)).expect("the ninth view opens once one closes");
    });
});

#[test]
fn adding_references_in_a_batch_does_what_one_at_a_time_does() {
    // `incref_all` (a node copy) opens each count block once; it must leave the same counts
    // as `incref` address by address, with addresses in two groups, out of order and listed
    // twice.
    let run = |batched: bool| {
        let s = store(&MemBackend::new(), 4096, 4096);
        let mut t = s.begin().unwrap();
        let mut blocks: Vec<BlockAddr> = (0..1500).map(|_| t.alloc_data().unwrap()).collect();
        blocks.reverse();
        let gain: Vec<BlockAddr> =
            blocks.iter().step_by(3).flat_map(|&b| [b, b]).chain(blocks.iter().step_by(5).copied()).collect();
        if batched {
            t.incref_all(&gain).unwrap();
        } else {
            for &b in &gain {
                t.incref(b).unwrap();
            }
        }
        let counts: Vec<u32> = blocks.iter().map(|&b| t.refcount(b).unwrap()).collect();
        t.finish().unwrap();
        counts
    };
    let counts = run(true);
    assert!(counts == run(false), "the counts differ");
    for (i, &count) in counts.iter().enumerate() {
        let want = 1 + if i % 3 == 0 { 2 } else { 0 } + u32::from(i % 5 == 0);
        assert_eq!(count, want, "block {i}");
    }
}

#[test]
fn a_batch_of_references_that_meets_a_free_block_changes_nothing() {
    let s = store(&MemBackend::new(), 4096, 4096);
    let mut t = s.begin().unwrap();
    let kept = t.alloc_data().unwrap();
    let gone = t.alloc_data().unwrap();
    t.decref(gone).unwrap();
    t.finish().unwrap();
    let mut t = s.begin().unwrap();
    let err = t.incref_all(&[kept, gone]).unwrap_err();
    assert!(matches!(err, StoreError::Damaged(_)), "{err}");
    drop(t);
    assert_eq!(s.lock().refcount(kept).unwrap(), 1, "the transaction rolled back");
}

#[test]
fn a_commit_writes_blocks_at_consecutive_addresses_in_one_request() {
    // A copy-on-write's node copies sit together; one request per block would cost a syscall
    // (a round trip on RADOS) each. 300 new blocks and the changed count block: two runs of
    // new blocks (a request holds at most 1 MiB), the record, the count block and the
    // superblock copy home.
    let medium =
        Arc::new(CountingSyncs { inner: MemBackend::new(), syncs: Default::default(), writes: Default::default() });
    let s = BlockStore::create(medium.clone(), &CreateOptions::default(), &OpenOptions::default()).unwrap();
    let mut t = s.begin().unwrap();
    let blocks: Vec<BlockAddr> = (0..300).map(|_| t.alloc_meta(&TEST_KIND).unwrap()).collect();
    t.finish().unwrap();
    assert!(blocks.windows(2).all(|w| w[1].0 == w[0].0 + 1), "new metadata blocks are consecutive");
    let writes = || medium.writes.load(std::sync::atomic::Ordering::SeqCst);
    let before = writes();
    s.commit().unwrap();
    assert_eq!(writes() - before, 5, "writes of one commit");
    drop(s);
    let s = BlockStore::open(medium.clone(), &OpenOptions::default()).unwrap();
    for &b in &blocks {
        s.lock().read(b, &TEST_KIND).unwrap();
    }
}

/// Derived state for the tests below: a value and the record of how to undo its changes, as
/// radix's chain index keeps one.
#[derive(Debug)]
struct Tally {
    value: u32,
    /// The value at `begin`, while a transaction records.
    before: Option<u32>,
    /// `undo` declines (as an index that recorded too little does).
    undo_declines: bool,
    /// A change failed half-way: `keep` declines.
    failed: bool,
}

impl Tally {
    fn boxed(value: u32) -> Box<Tally> {
        Box::new(Tally { value, before: None, undo_declines: false, failed: false })
    }
}

impl DerivedState for Tally {
    fn begin(&mut self) {
        assert!(self.before.is_none(), "begun twice");
        self.before = Some(self.value);
    }
    fn keep(&mut self) -> bool {
        self.before = None;
        !self.failed
    }
    fn undo(&mut self) -> bool {
        match self.before.take() {
            Some(v) if !self.undo_declines => {
                self.value = v;
                true
            }
            _ => false,
        }
    }
}

/// Takes the state in `m`, adds one to it and puts it back.
fn bump(m: &mut Meta) {
    let mut d = m.take_derived::<Tally>().unwrap();
    d.value += 1;
    m.put_derived(d);
}

fn kept(s: &BlockStore) -> Option<u32> {
    s.lock().take_derived::<Tally>().map(|t| t.value)
}

#[test]
fn a_rollback_undoes_derived_state_the_transaction_took_and_keeps_what_it_never_took() {
    // The layer above keeps an index derived from its blocks here (radix's chain index, whose
    // rebuild reads the whole chain table under the lock). A transaction that never took it
    // cannot have changed what it was derived from, so its rollback keeps it as it is; one
    // that took it has its changes undone with the blocks' and the state stays.
    let s = store(&MemBackend::new(), 4096, 4096);
    s.lock().put_derived(Tally::boxed(7));
    let mut t = s.begin().unwrap();
    t.alloc_data().unwrap();
    drop(t);
    assert_eq!(kept(&s), Some(7), "kept by a rollback that never took it");

    s.lock().put_derived(Tally::boxed(8));
    let mut t = s.begin().unwrap();
    bump(&mut t);
    // Taken again in the same transaction: still one record, from the first take.
    bump(&mut t);
    t.alloc_data().unwrap();
    drop(t);
    assert_eq!(kept(&s), Some(8), "undone by a rollback that took it");

    s.lock().put_derived(Tally::boxed(9));
    let mut t = s.begin().unwrap();
    bump(&mut t);
    t.alloc_data().unwrap();
    t.finish().unwrap();
    let mut t = s.begin().unwrap();
    t.alloc_data().unwrap();
    drop(t);
    assert_eq!(kept(&s), Some(10), "a finished transaction's changes stay");
}

#[test]
fn derived_state_that_cannot_be_undone_or_kept_is_dropped() {
    let s = store(&MemBackend::new(), 4096, 4096);
    // Its undo declines: dropped, to be rebuilt from the blocks.
    let mut d = Tally::boxed(7);
    d.undo_declines = true;
    s.lock().put_derived(d);
    let mut t = s.begin().unwrap();
    let d = t.take_derived::<Tally>().unwrap();
    t.put_derived(d);
    drop(t);
    assert_eq!(kept(&s), None, "dropped: its undo declined");

    // Taken, then put back after a change failed half-way, and the transaction is finished
    // anyway: keep declines, and it is dropped.
    s.lock().put_derived(Tally::boxed(7));
    let mut t = s.begin().unwrap();
    let mut d = t.take_derived::<Tally>().unwrap();
    d.failed = true;
    t.put_derived(d);
    t.finish().unwrap();
    assert_eq!(kept(&s), None, "dropped: kept after a failed change");

    // Taken and replaced by state built inside the transaction, which never began a record:
    // its undo declines, and the rollback drops it.
    s.lock().put_derived(Tally::boxed(7));
    let mut t = s.begin().unwrap();
    drop(t.take_derived::<Tally>());
    t.put_derived(Tally::boxed(70));
    drop(t);
    assert_eq!(kept(&s), None, "dropped: put in place of what the transaction took");
}

#[test]
fn derived_state_lent_read_only_survives_a_rollback_and_state_built_in_a_transaction_does_not() {
    let s = store(&MemBackend::new(), 4096, 4096);
    // Lent read-only to a step that then fails (a cache miss, say): in place, and the
    // rollback keeps it without asking it to undo anything.
    let mut d = Tally::boxed(7);
    d.undo_declines = true;
    s.lock().put_derived(d);
    let mut t = s.begin().unwrap();
    t.alloc_data().unwrap();
    let seen = t.lend_derived::<Tally, _>(|_, d| d.map(|d| d.value));
    assert_eq!(seen, Some(7));
    drop(t);
    assert_eq!(kept(&s), Some(7), "kept: lending is not taking");

    // None kept: a transaction builds it from its own blocks and puts it. Its rollback must
    // drop it, or the state would describe blocks the rollback just put back.
    let mut t = s.begin().unwrap();
    t.alloc_data().unwrap();
    t.lend_derived::<Tally, _>(|m, d| {
        assert!(d.is_none());
        m.put_derived(Tally::boxed(8));
    });
    assert_eq!(t.lend_derived::<Tally, _>(|_, d| d.map(|d| d.value)), Some(8), "what the step put stays");
    drop(t);
    assert_eq!(kept(&s), None, "dropped: built inside the transaction that rolled back");

    // The same when a take found none and the transaction then built it.
    let mut t = s.begin().unwrap();
    assert!(t.take_derived::<Tally>().is_none());
    t.put_derived(Tally::boxed(9));
    drop(t);
    assert_eq!(kept(&s), None, "dropped: built after a take found none");
}
