//! Leaf copies linked in chains (radix::Chains, docs/format.md §6 and §7.3): chains and the
//! table stay within their bounds, and every count stays exact while they are cut.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{BlockAddr, MemBackend};
use common::*;
use vdi::Registry;

fn chains(reg: &Arc<Registry>) -> radix::Chains {
    radix::Chains::load(&mut reg.store().lock()).expect("chain table reads")
}

/// The length of the longest chain, in leaves.
fn longest_chain(ch: &radix::Chains) -> usize {
    let source: HashMap<BlockAddr, BlockAddr> = ch.links().collect();
    source
        .keys()
        .map(|&c| {
            let mut len = 1;
            let mut at = c;
            while let Some(&s) = source.get(&at) {
                len += 1;
                at = s;
            }
            len
        })
        .max()
        .unwrap_or(0)
}

/// A snapshot and a write to the one leaf, round after round: every write copies the leaf, so
/// the chain would grow by one per round. It is cut at its top once it is `MAX_CHAIN` long, and
/// deleting snapshots in the middle of it (and reclaiming them) splices it; the counts stay
/// exact throughout and every snapshot keeps its contents.
#[test]
fn a_chain_is_cut_at_its_bound_and_counts_stay_exact() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    let blocks = (SIZE / 4096) as usize;
    let mut model = vec![0u8; blocks];
    let mut snaps = Vec::new();
    let mut longest = 0;
    for round in 0..(radix::MAX_CHAIN as u64 + 40) {
        let v = (round % 250) as u8 + 1;
        let at = (round * 7) as usize % blocks;
        dev.write_at(at as u64 * 4096, &vec![v; 4096], false).unwrap();
        model[at] = v;
        snaps.push((reg.snapshot(a).unwrap(), model.clone()));
        if round % 9 == 8 {
            // A snapshot from the middle of the chain goes, and the queue frees its leaf.
            let (gone, _) = snaps.remove(snaps.len() / 2);
            reg.delete_snapshot(gone).unwrap();
            reg.reclaim_all(&mut |_, _| {}).unwrap();
        }
        longest = longest.max(longest_chain(&chains(&reg)));
        if round % 16 == 0 {
            assert_clean(&reg);
        }
    }
    assert_eq!(longest, radix::MAX_CHAIN, "the chain reached its bound, and no further");
    assert_clean(&reg);
    for (sid, want) in &snaps {
        let mut got = vec![0u8; SIZE as usize];
        reg.open_snapshot(*sid).unwrap().read_at(0, &mut got).unwrap();
        let got: Vec<u8> = got.chunks(4096).map(|b| b[0]).collect();
        assert_eq!(&got, want, "snapshot {sid}");
    }
    // Deleting everything frees everything: no count was left behind by a cut or a splice.
    for (sid, _) in snaps {
        reg.delete_snapshot(sid).unwrap();
    }
    drop(dev);
    reg.delete_vdi(a).unwrap();
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    assert_clean(&reg);
    assert!(chains(&reg).is_empty(), "no link outlives its leaves");
}

/// More leaf copies at once than the table keeps: the oldest links are cut, the table holds
/// `MAX_LINKS`, and the counts are exact.
#[test]
fn the_table_keeps_at_most_its_bound_of_links() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let leaves = radix::MAX_LINKS as u64 + 100;
    let a = reg.create_vdi("a", Some(leaves * 512 * 4096)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    for leaf in 0..leaves {
        dev.write_at(leaf * 512 * 4096, &[1u8; 4096], false).unwrap();
    }
    reg.snapshot(a).unwrap();
    for leaf in 0..leaves {
        dev.write_at(leaf * 512 * 4096 + 4096, &[2u8; 4096], false).unwrap();
    }
    let ch = chains(&reg);
    assert_eq!(ch.len(), radix::MAX_LINKS, "the table is full, and no fuller");
    assert_clean(&reg);
    let mut b = [0u8; 8192];
    dev.read_at((leaves - 1) * 512 * 4096, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 1) && b[4096..].iter().all(|&x| x == 2));
}

/// A leaf in the middle of a chain, reached by a clone once the snapshot that held it is gone,
/// is copied, not claimed: claiming it would let the clone change a leaf whose copy below
/// still inherits from it, and the live VDI's next write would then free a block the oldest
/// snapshot still maps.
#[test]
fn a_clone_never_changes_a_leaf_in_the_middle_of_a_chain() {
    let reg = new_store(Arc::new(MemBackend::new()));
    let a = reg.create_vdi("a", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(a, true).unwrap();
    dev.write_at(0, &[1u8; 4096], false).unwrap();
    let s1 = reg.snapshot(a).unwrap();
    dev.write_at(4096, &[2u8; 4096], false).unwrap();
    let s2 = reg.snapshot(a).unwrap();
    dev.write_at(2 * 4096, &[3u8; 4096], false).unwrap();
    // Chain: s1's leaf -> s2's leaf -> the live leaf, all three naming block 0's data.
    assert_eq!(longest_chain(&chains(&reg)), 3);
    let c = reg.clone_snapshot("c", s2).unwrap();
    reg.delete_snapshot(s2).unwrap();
    reg.reclaim_all(&mut |_, _| {}).unwrap();
    let clone = reg.open_vdi(c, true).unwrap();
    clone.write_at(0, &[4u8; 4096], false).unwrap();
    assert_clean(&reg);
    dev.write_at(0, &[5u8; 4096], false).unwrap();
    assert_clean(&reg);
    let mut b = [0u8; 4096];
    reg.open_snapshot(s1).unwrap().read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1), "the oldest snapshot keeps its block");
    clone.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    dev.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 5));
}
