//! The chain index follows a rollback: a transaction that copies, cuts or frees chained leaves
//! and is then rolled back (an error, a cache miss retried) leaves the kept index as the chain
//! table is again — undone, not dropped and rebuilt under the lock.

use std::sync::Arc;

use blockstore::{BlockAddr, BlockStore, CreateOptions, MemBackend, OpenOptions};
use radix::Chains;

/// Links (sorted) and table blocks of an index.
type Described = (Vec<(BlockAddr, BlockAddr)>, Vec<BlockAddr>);

fn describe(ch: &Chains) -> Described {
    let mut links: Vec<_> = ch.links().collect();
    links.sort();
    (links, ch.table_blocks().collect())
}

/// The index the store keeps, if it keeps one (lent: nothing changes).
fn kept(s: &BlockStore) -> Option<Described> {
    s.lock().lend_derived::<Chains, _>(|_, ch| ch.map(describe))
}

/// The chain table as the blocks say.
fn table(s: &BlockStore) -> Described {
    describe(&Chains::load(&mut *s.lock()).expect("the chain table reads"))
}

fn store() -> BlockStore {
    let create = CreateOptions { journal_slot_blocks: 4096, max_blocks: 0 };
    BlockStore::create(
        Arc::new(MemBackend::new()),
        &create,
        &OpenOptions { cache_blocks: 8192, ..OpenOptions::default() },
    )
    .expect("a store in memory")
}

/// Maps a fresh data block at `vblock` of the tree at `root` (copying what it shares).
fn write(t: &mut blockstore::Transaction<'_>, root: BlockAddr, vblock: u64) {
    let b = t.alloc_data().expect("a data block");
    radix::map(t, root, vblock, b).expect("map");
}

const LEAVES: u64 = 8;
const LEAF_SPAN: u64 = radix::ENTRIES as u64;

#[test]
fn a_rollback_undoes_the_chain_index_instead_of_dropping_it() {
    let s = store();
    // A tree with data in each of 8 leaves, snapshotted twice (its root kept, writes going on
    // through a fork of it), each time followed by a write to leaf 0: two leaf copies, a chain
    // of three.
    let mut t = s.begin().unwrap();
    let first = radix::create(&mut t).unwrap();
    for leaf in 0..LEAVES {
        write(&mut t, first, leaf * LEAF_SPAN);
    }
    let second = radix::fork(&mut t, first).unwrap();
    write(&mut t, second, 1);
    let root = radix::fork(&mut t, second).unwrap();
    write(&mut t, root, 2);
    t.finish().unwrap();
    let start = kept(&s).expect("kept by a finished transaction");
    assert_eq!(start.0.len(), 2, "two leaf copies linked");
    assert_eq!(start, table(&s));

    // Copies of the other leaves (new links, and a new table block's worth of records
    // changed), rolled back.
    let mut t = s.begin().unwrap();
    for leaf in 1..LEAVES {
        write(&mut t, root, leaf * LEAF_SPAN + 3);
    }
    assert_eq!(
        t.lend_derived::<Chains, _>(|_, ch| ch.map(|c| c.len())),
        Some(2 + LEAVES as usize - 1),
        "linked inside the transaction"
    );
    drop(t);
    assert_eq!(kept(&s), Some(start.clone()), "undone by the rollback, not dropped");
    assert_eq!(table(&s), start);

    // Freeing the newer fork takes its leaf 0 — the middle of the chain — out of it: the
    // link below it is re-pointed at the top. Rolled back.
    let mut t = s.begin().unwrap();
    radix::release(&mut t, second).unwrap();
    let inside = t.lend_derived::<Chains, _>(|_, ch| ch.map(describe)).expect("kept inside");
    assert_eq!(inside.0.len(), 1, "the middle's links are one inside the transaction");
    assert!(!start.0.contains(&inside.0[0]), "re-pointed inside the transaction");
    drop(t);
    assert_eq!(kept(&s), Some(start.clone()), "undone by the rollback, not dropped");
    assert_eq!(table(&s), start);

    // Freeing the older fork takes its leaf 0 — the top of the chain — out of it: the link
    // below it is removed. Rolled back, then done for real.
    for finish in [false, true] {
        let mut t = s.begin().unwrap();
        radix::release(&mut t, first).unwrap();
        let inside = t.lend_derived::<Chains, _>(|_, ch| ch.map(describe)).expect("kept inside");
        assert_eq!(inside.0.len(), 1, "the top's link is gone inside the transaction");
        if finish {
            t.finish().unwrap();
            assert_eq!(kept(&s), Some(inside), "a finished transaction keeps its changes");
        } else {
            drop(t);
            assert_eq!(kept(&s), Some(start.clone()), "undone by the rollback, not dropped");
        }
        assert_eq!(kept(&s), Some(table(&s)));
    }

    // The middle of what was the chain (now its top) freed after more copies in the same
    // transaction: links made, removed and re-pointed in one transaction, rolled back.
    let before = kept(&s).expect("kept");
    let mut t = s.begin().unwrap();
    for leaf in 1..LEAVES {
        write(&mut t, root, leaf * LEAF_SPAN + 5);
    }
    radix::release(&mut t, second).unwrap();
    drop(t);
    assert_eq!(kept(&s), Some(before.clone()), "undone by the rollback, not dropped");
    assert_eq!(table(&s), before);
}
