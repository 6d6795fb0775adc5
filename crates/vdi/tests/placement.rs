//! Where the store places new blocks, which decides what a copy-on-write after a snapshot
//! costs: tree nodes are packed in groups of their own, and a leaf's new data goes to the
//! group its other data is in (docs/design.md, "What a copy-on-write costs after a snapshot").

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::format::GROUP_BLOCKS;
use blockstore::{BlockAddr, BlockStore, CreateOptions, MemBackend, OpenOptions};
use radix::Mapping;
use vdi::{Registry, VdiId};

const MIB: u64 = 1 << 20;

fn filled(size: u64) -> (Arc<Registry>, VdiId) {
    let store = BlockStore::create(Arc::new(MemBackend::new()), &CreateOptions::default(), &OpenOptions::default())
        .expect("store");
    let reg = Registry::open(Arc::new(store)).expect("registry");
    let id = reg.create_vdi("vm", Some(size)).expect("create");
    let dev = reg.open_vdi(id, true).expect("open");
    let chunk = vec![0x5au8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        dev.write_at(off, &chunk, false).expect("fill");
    }
    dev.flush().expect("flush");
    (reg, id)
}

/// The allocation groups holding virtual blocks `vblocks` of VDI `id`.
fn groups_of(reg: &Arc<Registry>, id: VdiId, vblocks: std::ops::Range<u64>) -> HashSet<u64> {
    let root = BlockAddr(reg.info(id).expect("info").root);
    let mut meta = reg.store().lock();
    let group_of = meta.group_of();
    vblocks
        .map(|vb| match radix::lookup(&mut meta, root, vb).expect("lookup") {
            Mapping::Mapped { addr, .. } => group_of(addr).expect("a block in a group"),
            Mapping::Unmapped => panic!("virtual block {vb} is not mapped"),
        })
        .collect()
}

#[test]
fn the_first_write_after_a_snapshot_commits_few_count_blocks() {
    // 256 MiB: 128 leaves under one node, their data spread over 64 groups. Copying that node
    // adds a reference to each of its 128 leaves: with the leaves packed together that is one
    // count block; with each leaf beside its data it would be one per group.
    let (reg, id) = filled(256 * MIB);
    reg.snapshot(id).expect("snapshot");
    let dev = reg.open_vdi(id, true).expect("open");
    dev.write_at(100 * MIB, &[7u8; 4096], false).expect("write");
    let info = reg.store().commit().expect("commit");
    // Root, two upper nodes and the leaf copied (4), the data block's and the nodes' count
    // blocks, the counts of the copied nodes' children (leaves: one block; data: the leaf's
    // one or two groups), the registry's block and the superblock's share: about a dozen.
    assert!(info.blocks <= 16, "the first write after a snapshot committed {} metadata blocks", info.blocks);
}

#[test]
fn new_data_stays_in_the_group_of_its_leaf() {
    // 64 MiB: 32 leaves over 16 groups. Each round takes a snapshot and rewrites a random block
    // (a copy-on-write); retention keeps four snapshots, so old copies are freed as it goes.
    // Placed at the allocator's cursor, each leaf's new blocks would land wherever the cursor
    // was, mixed with every other leaf's.
    let (reg, id) = filled(64 * MIB);
    let dev = reg.open_vdi(id, true).expect("open");
    let leaves = 32u64;
    let spread = |reg: &Arc<Registry>| -> usize {
        (0..leaves).map(|l| groups_of(reg, id, l * 512..(l + 1) * 512).len()).max().expect("leaves")
    };
    let before = spread(&reg);
    let mut snaps = VecDeque::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        snaps.push_back(reg.snapshot(id).expect("snapshot"));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        dev.write_at((rng % (leaves * 512)) * 4096, &[rng as u8; 4096], false).expect("write");
        if snaps.len() > 4 {
            reg.delete_snapshot(snaps.pop_front().expect("oldest")).expect("delete");
            reg.reclaim_all(&mut |_, _| {}).expect("reclaim");
        }
    }
    dev.flush().expect("flush");
    let after = spread(&reg);
    // A leaf starts in one or two groups; it may spill into a few while its group is full.
    assert!(after <= before + 3, "a leaf's data went from at most {before} groups to {after}");
}

#[test]
fn a_store_that_cannot_grow_gives_data_the_metadata_groups_free_blocks() {
    // Room for one allocation group only: metadata and data must share it, and a VDI can be
    // written until the group is full.
    let probe = BlockStore::create(Arc::new(MemBackend::new()), &CreateOptions::default(), &OpenOptions::default())
        .expect("store");
    let max_blocks = probe.lock().superblock().groups_start + GROUP_BLOCKS;
    let create = CreateOptions { max_blocks, ..CreateOptions::default() };
    let store = BlockStore::create(Arc::new(MemBackend::new()), &create, &OpenOptions::default()).expect("store");
    let reg = Registry::open(Arc::new(store)).expect("registry");
    let id = reg.create_vdi("vm", Some(4 * MIB)).expect("create");
    let dev = reg.open_vdi(id, true).expect("open");
    // 3.5 MiB of 3.97 MiB: data goes where the metadata lives.
    let chunk = vec![0x77u8; 512 * 1024];
    for k in 0..7u64 {
        dev.write_at(k * 512 * 1024, &chunk, false).expect("a write that fits in the store");
    }
    dev.flush().expect("flush");
    let mut back = vec![0u8; chunk.len()];
    dev.read_at(6 * 512 * 1024, &mut back).expect("read");
    assert_eq!(back, chunk);
}
