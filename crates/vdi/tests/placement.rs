//! Where the store places new blocks, which decides what a copy-on-write after a snapshot
//! costs: tree nodes are packed in groups of their own, and the new data of one commit sits
//! together (docs/design.md, "Placement").

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
fn the_new_data_of_one_commit_sits_in_few_groups() {
    // 64 MiB: 32 leaves over 16 groups. Each round takes a snapshot and rewrites a random block
    // (a copy-on-write); retention keeps four snapshots, so old copies are freed as it goes and
    // leave holes all over the store. Then 64 copy-on-writes to random blocks, one commit: their
    // new blocks come from the allocator's cursor, so their counts share few count blocks. (Placed
    // beside each leaf's other data, they would touch one count block per group written.)
    let (reg, id) = filled(64 * MIB);
    let dev = reg.open_vdi(id, true).expect("open");
    let blocks = 64 * MIB / 4096;
    let mut snaps = VecDeque::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..2000 {
        snaps.push_back(reg.snapshot(id).expect("snapshot"));
        let r = next();
        dev.write_at((r % blocks) * 4096, &[r as u8; 4096], false).expect("write");
        if snaps.len() > 4 {
            reg.delete_snapshot(snaps.pop_front().expect("oldest")).expect("delete");
            reg.reclaim_all(&mut |_, _| {}).expect("reclaim");
        }
    }
    dev.flush().expect("flush");
    reg.snapshot(id).expect("snapshot");
    let written: Vec<u64> = (0..64).map(|_| next() % blocks).collect();
    for (k, vb) in written.iter().enumerate() {
        dev.write_at(vb * 4096, &[k as u8; 4096], false).expect("write");
    }
    dev.flush().expect("flush");
    let groups = written.iter().flat_map(|&vb| groups_of(&reg, id, vb..vb + 1)).collect::<HashSet<u64>>().len();
    assert!(groups <= 4, "64 copy-on-writes of one commit put their new data in {groups} groups");
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
