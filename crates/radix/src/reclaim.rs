//! The release queue: deleting a tree of any size in bounded, durable steps.
//!
//! Releasing a tree costs time and metadata changes proportional to what it alone owns, which
//! for a large VDI is more than one commit can hold. So a delete only *queues* the tree's root
//! (one entry, one metadata block at most) and returns; [`reclaim_step`] then does the work a
//! bounded amount at a time, each step in its own transaction and commit. The queue lives in
//! the store's metadata, so it survives crashes and restarts, and every step leaves a state in
//! which every block is counted exactly (`vdi check` counts the references the queue holds).
//!
//! The queue is a stack of blocks (magic `RELQ`): superblock user slot [`QUEUE_SLOT`] holds the
//! top block, each block the one below it. An entry names a block and holds one reference to it:
//!
//! - a plain block (a VDI record, a snapshot-log block, a data block): drop the reference;
//! - a radix node of level L with a cursor c: when c is 0 and the node is shared, drop the
//!   reference; otherwise the queue owns the node, entries before c have been released, and the
//!   next step releases entry c (a data block directly, a child node by pushing it), then
//!   advances c. At c = 512 the node itself is freed.
//!
//! Children are pushed one at a time, so a step changes a handful of blocks however large the
//! tree, and the stack grows by at most one entry per level of each tree being released.
//! An emptied queue block is kept as a spare (user slot [`QUEUE_SPARE_SLOT`]) rather than freed,
//! so queueing works on a store that is full.

use blockstore::format::{META_HEADER_LEN, seal_meta, verify_meta};
use blockstore::{BLOCK_SIZE, BlockAddr, Meta, MetaKind, MetaRead, Result, StoreError};

use crate::node::{ENTRIES, LEVELS, Node};

/// Superblock user slot holding the top block of the release queue (0: empty).
pub const QUEUE_SLOT: usize = 15;
/// Superblock user slot holding the number of entries in the release queue.
pub const QUEUE_LEN_SLOT: usize = 14;
/// Superblock user slot holding an empty spare queue block (0: none), so that a delete or a
/// reclaim step can queue work on a full store.
pub const QUEUE_SPARE_SLOT: usize = 13;
/// Magic of a release-queue block, `RELQ` on disk.
pub const QUEUE_MAGIC: u32 = u32::from_le_bytes(*b"RELQ");
/// Entries one queue block holds.
pub const QUEUE_ENTRIES: usize = (BLOCK_SIZE - 32) / 8;

const BELOW_AT: usize = META_HEADER_LEN;
const COUNT_AT: usize = META_HEADER_LEN + 8;
const ENTRIES_AT: usize = 32;
const ADDR_MASK: u64 = (1 << 48) - 1;
const KIND_SHIFT: u32 = 48;
const CURSOR_SHIFT: u32 = 52;

/// Release-queue blocks.
pub static QUEUE_KIND: MetaKind = MetaKind {
    name: "release-queue",
    seal: |b, a| seal_meta(b, QUEUE_MAGIC, a),
    verify: |b, a| {
        verify_meta(b, QUEUE_MAGIC, a)?;
        let count = u32::from_le_bytes([b[COUNT_AT], b[COUNT_AT + 1], b[COUNT_AT + 2], b[COUNT_AT + 3]]);
        if count as usize > QUEUE_ENTRIES {
            return Err(format!("holds {count} entries, more than the {QUEUE_ENTRIES} that fit"));
        }
        Ok(())
    },
};

/// What one queue entry holds a reference to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// One reference to a block that has no children to release.
    Block(BlockAddr),
    /// One reference to a radix node; entries before `cursor` are already released.
    Node {
        /// The node.
        addr: BlockAddr,
        /// Its level (0 = leaf).
        level: u32,
        /// Entries `0..cursor` have been released (then the queue owns the node alone).
        cursor: usize,
    },
}

impl Queued {
    fn encode(self) -> u64 {
        match self {
            Queued::Block(a) => a.0 & ADDR_MASK,
            Queued::Node { addr, level, cursor } => {
                (addr.0 & ADDR_MASK) | (u64::from(level + 1) << KIND_SHIFT) | ((cursor as u64) << CURSOR_SHIFT)
            }
        }
    }

    fn decode(raw: u64, at: BlockAddr) -> Result<Queued> {
        let addr = BlockAddr(raw & ADDR_MASK);
        let kind = (raw >> KIND_SHIFT) & 0xF;
        let cursor = (raw >> CURSOR_SHIFT) as usize;
        let bad = |why: String| StoreError::Corrupt { kind: QUEUE_KIND.name, addr: at, reason: why };
        if addr.is_none() {
            return Err(bad("an entry names block 0".into()));
        }
        match kind {
            0 if cursor == 0 => Ok(Queued::Block(addr)),
            k @ 1..=4 if cursor <= ENTRIES => Ok(Queued::Node { addr, level: k as u32 - 1, cursor }),
            _ => Err(bad(format!("entry {raw:#018x} is not a valid release"))),
        }
    }
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn count_of(b: &[u8]) -> usize {
    u32::from_le_bytes([b[COUNT_AT], b[COUNT_AT + 1], b[COUNT_AT + 2], b[COUNT_AT + 3]]) as usize
}

fn set_count(b: &mut [u8], n: usize) {
    b[COUNT_AT..COUNT_AT + 4].copy_from_slice(&(n as u32).to_le_bytes());
}

/// Entries waiting in the release queue.
pub fn queue_len<M: MetaRead + ?Sized>(meta: &M) -> u64 {
    meta.user(QUEUE_LEN_SLOT)
}

fn add_len(meta: &mut Meta, delta: i64) -> Result<()> {
    let n = meta
        .user(QUEUE_LEN_SLOT)
        .checked_add_signed(delta)
        .ok_or_else(|| StoreError::Damaged("the release queue's length went below zero".into()))?;
    meta.set_user(QUEUE_LEN_SLOT, n)
}

fn push(meta: &mut Meta, q: Queued) -> Result<()> {
    let top = BlockAddr(meta.user(QUEUE_SLOT));
    let room = if top.is_none() { false } else { count_of(meta.read(top, &QUEUE_KIND)?) < QUEUE_ENTRIES };
    let top = if room {
        top
    } else {
        // A new top block: the spare if there is one (so this works on a full store), then
        // a new spare if space allows.
        let spare = BlockAddr(meta.user(QUEUE_SPARE_SLOT));
        let fresh = if spare.is_none() {
            meta.alloc_meta(&QUEUE_KIND)?
        } else {
            meta.set_user(QUEUE_SPARE_SLOT, 0)?;
            spare
        };
        let b = meta.write(fresh, &QUEUE_KIND)?;
        b[META_HEADER_LEN..].fill(0);
        b[BELOW_AT..BELOW_AT + 8].copy_from_slice(&top.0.to_le_bytes());
        meta.set_user(QUEUE_SLOT, fresh.0)?;
        if !spare.is_none() {
            // Best effort: a full store simply goes without a spare until a block empties.
            match ensure_spare(meta) {
                Ok(()) | Err(StoreError::NoSpace { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        fresh
    };
    let b = meta.write(top, &QUEUE_KIND)?;
    let n = count_of(b);
    b[ENTRIES_AT + n * 8..ENTRIES_AT + n * 8 + 8].copy_from_slice(&q.encode().to_le_bytes());
    set_count(b, n + 1);
    add_len(meta, 1)
}

/// Makes sure an empty spare queue block exists, allocating one if needed (fails with
/// `NoSpace` on a full store).
pub fn ensure_spare(meta: &mut Meta) -> Result<()> {
    if meta.user(QUEUE_SPARE_SLOT) != 0 {
        return Ok(());
    }
    let b = meta.alloc_meta(&QUEUE_KIND)?;
    meta.write(b, &QUEUE_KIND)?;
    meta.set_user(QUEUE_SPARE_SLOT, b.0)
}

/// The top entry, if any, with where it lives.
fn peek(meta: &mut Meta) -> Result<Option<(BlockAddr, usize, Queued)>> {
    let top = BlockAddr(meta.user(QUEUE_SLOT));
    if top.is_none() {
        return Ok(None);
    }
    let b = meta.read(top, &QUEUE_KIND)?;
    let n = count_of(b);
    if n == 0 {
        return Err(StoreError::Corrupt { kind: QUEUE_KIND.name, addr: top, reason: "top block is empty".into() });
    }
    let raw = read_u64(b, ENTRIES_AT + (n - 1) * 8);
    Ok(Some((top, n - 1, Queued::decode(raw, top)?)))
}

fn replace_top(meta: &mut Meta, top: BlockAddr, slot: usize, q: Queued) -> Result<()> {
    let b = meta.write(top, &QUEUE_KIND)?;
    b[ENTRIES_AT + slot * 8..ENTRIES_AT + slot * 8 + 8].copy_from_slice(&q.encode().to_le_bytes());
    Ok(())
}

fn pop(meta: &mut Meta, top: BlockAddr, slot: usize) -> Result<()> {
    if slot == 0 {
        let below = read_u64(meta.read(top, &QUEUE_KIND)?, BELOW_AT);
        meta.set_user(QUEUE_SLOT, below)?;
        if meta.user(QUEUE_SPARE_SLOT) == 0 {
            // Keep the emptied block as the spare.
            meta.write(top, &QUEUE_KIND)?[META_HEADER_LEN..].fill(0);
            meta.set_user(QUEUE_SPARE_SLOT, top.0)?;
        } else {
            meta.decref(top)?;
        }
    } else {
        let b = meta.write(top, &QUEUE_KIND)?;
        b[ENTRIES_AT + slot * 8..ENTRIES_AT + slot * 8 + 8].fill(0);
        set_count(b, slot);
    }
    add_len(meta, -1)
}

/// Hands the caller's reference to the tree at `root` to the release queue: the tree is freed
/// by later [`reclaim_step`]s. Costs one queue entry.
pub fn defer_release(meta: &mut Meta, root: BlockAddr) -> Result<()> {
    defer_node(meta, root, LEVELS - 1)
}

/// [`defer_release`] for a subtree whose root is a node of `level`.
pub fn defer_node(meta: &mut Meta, node: BlockAddr, level: u32) -> Result<()> {
    push(meta, Queued::Node { addr: node, level, cursor: 0 })
}

/// Hands the caller's reference to a block with no children (a data block, a VDI record, a
/// snapshot-log block) to the release queue.
pub fn defer_release_block(meta: &mut Meta, block: BlockAddr) -> Result<()> {
    push(meta, Queued::Block(block))
}

/// What a call of [`reclaim_step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Blocks freed.
    pub freed: u64,
    /// Entries still queued.
    pub remaining: u64,
}

/// Releases queued trees until the open transaction has changed `budget` metadata blocks or
/// the queue is empty. Each release changes at most a few blocks, so a transaction stays
/// within `budget + 8` blocks whatever the trees' sizes.
pub fn reclaim_step(meta: &mut Meta, budget: usize) -> Result<Reclaimed> {
    let mut freed = 0;
    while meta.transaction_blocks() < budget {
        let Some((top, slot, q)) = peek(meta)? else {
            if queue_len(meta) != 0 {
                return Err(StoreError::Damaged(format!(
                    "the release queue's length says {} entries but the queue is empty (run `vdi check`)",
                    queue_len(meta)
                )));
            }
            break;
        };
        match q {
            Queued::Block(a) => {
                pop(meta, top, slot)?;
                freed += u64::from(meta.decref(a)? == 0);
            }
            Queued::Node { addr, level, cursor } => {
                if cursor == 0 && meta.refcount(addr)? > 1 {
                    pop(meta, top, slot)?;
                    meta.decref(addr)?;
                    continue;
                }
                // The queue owns this node alone: nothing else can reach it any more. A leaf
                // leaves its chain first (once), keeping only the references that are its own.
                if level == 0 {
                    crate::chain::with_chains(meta, |m, ch| ch.unchain(m, addr))?;
                }
                let node = crate::tree::node_at(meta, addr, level)?;
                let next = (cursor..ENTRIES).find(|&k| !Node::entry(node, k).is_empty());
                let Some(k) = next else {
                    pop(meta, top, slot)?;
                    // The queue owned this node alone; a count that says otherwise is damage.
                    let left = meta.decref(addr)?;
                    if left != 0 {
                        return Err(StoreError::Damaged(format!(
                            "node {addr}, which the release queue owned alone, still has {left} references"
                        )));
                    }
                    freed += 1;
                    continue;
                };
                if level == 0 {
                    // A leaf: drop its data references from the cursor on, as many as the
                    // budget allows, and move the cursor once.
                    let entries: Vec<(usize, BlockAddr)> = (k..ENTRIES)
                        .map(|j| (j, Node::entry(node, j)))
                        .filter(|(_, e)| !e.is_empty())
                        .map(|(j, e)| (j, e.addr))
                        .collect();
                    let mut cursor = k;
                    for (j, child) in entries {
                        if cursor > k && meta.transaction_blocks() >= budget {
                            break;
                        }
                        freed += u64::from(meta.decref(child)? == 0);
                        cursor = j + 1;
                    }
                    replace_top(meta, top, slot, Queued::Node { addr, level, cursor })?;
                    continue;
                }
                let child = Node::entry(node, k).addr;
                replace_top(meta, top, slot, Queued::Node { addr, level, cursor: k + 1 })?;
                push(meta, Queued::Node { addr: child, level: level - 1, cursor: 0 })?;
            }
        }
    }
    Ok(Reclaimed { freed, remaining: queue_len(meta) })
}

/// Calls `f` for every queue block and every entry in the queue, top first, for checkers:
/// each queue block and each entry holds one reference.
pub fn visit_queue<M: MetaRead + ?Sized>(meta: &mut M, f: &mut dyn FnMut(QueueItem)) -> Result<()> {
    let spare = BlockAddr(meta.user(QUEUE_SPARE_SLOT));
    if !spare.is_none() {
        meta.read(spare, &QUEUE_KIND)?;
        f(QueueItem::QueueBlock(spare));
    }
    let mut at = BlockAddr(meta.user(QUEUE_SLOT));
    let mut blocks = 0u64;
    while !at.is_none() {
        blocks += 1;
        if blocks > 1 << 32 {
            return Err(StoreError::Damaged("the release queue loops".into()));
        }
        f(QueueItem::QueueBlock(at));
        let b = meta.read(at, &QUEUE_KIND)?;
        let n = count_of(b);
        let raws: Vec<u64> = (0..n).map(|i| read_u64(b, ENTRIES_AT + i * 8)).collect();
        let below = BlockAddr(read_u64(b, BELOW_AT));
        for raw in raws.into_iter().rev() {
            f(QueueItem::Entry(Queued::decode(raw, at)?));
        }
        at = below;
    }
    Ok(())
}

/// What [`visit_queue`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueItem {
    /// A block of the queue itself.
    QueueBlock(BlockAddr),
    /// An entry.
    Entry(Queued),
}
