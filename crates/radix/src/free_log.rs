//! The free log: data-block references that retention drops, applied later in batches sorted
//! by allocation group.
//!
//! Under snapshots every 10 ms, nearly every data block a deleted snapshot owned alone lies in
//! its own reference-count block, so dropping its reference at once dirties one count block —
//! a journal copy and a home write — per freed block. The release queue's leaf step instead
//! appends the block's address here (8 bytes in the log's top block), and the reference stays
//! counted until a batch applies it: the block cannot be handed out, and nothing can read it
//! (no tree names it through this reference any more). A batch is applied one window of
//! allocation groups at a time, so each count block is written once per batch for all the
//! frees it carries.
//!
//! Two stacks of log blocks (magic `FREL`), each block naming the one below it:
//! - the *log* (superblock user slot [`FREE_LOG_SLOT`]), which frees are appended to;
//! - the *batch* (slot [`FREE_BATCH_SLOT`]), a log sealed for applying, with a group cursor
//!   (slot [`FREE_BATCH_CURSOR_SLOT`]): its entries in groups below the cursor are applied (hold
//!   no reference), the others each hold one. [`CURSOR_DONE`] means every entry is applied and
//!   the batch's blocks are being freed. No batch: slot 0 and cursor 0.
//!
//! Every log block holds one reference (its own count 1) and every entry still to apply holds
//! one reference to the block it names; `vdi check` counts both. Each step is one transaction,
//! so a crash leaves either the step done or not.

use blockstore::format::{GROUP_BLOCKS, META_HEADER_LEN, seal_meta, verify_meta};
use blockstore::{BLOCK_SIZE, BlockAddr, Meta, MetaKind, MetaRead, Result, StoreError, Superblock};

/// Superblock user slot holding the top block of the free log (0: empty).
pub const FREE_LOG_SLOT: usize = 11;
/// Superblock user slot holding the top block of the batch being applied (0: none).
pub const FREE_BATCH_SLOT: usize = 10;
/// Superblock user slot holding the batch's cursor: entries in allocation groups below it are
/// applied.
pub const FREE_BATCH_CURSOR_SLOT: usize = 9;
/// The batch cursor once every entry is applied: the batch's own blocks are being freed.
pub const CURSOR_DONE: u64 = u64::MAX;
/// Magic of a free-log block, `FREL` on disk.
pub const FREE_LOG_MAGIC: u32 = u32::from_le_bytes(*b"FREL");
/// Entries one free-log block holds.
pub const FREE_LOG_ENTRIES: usize = (BLOCK_SIZE - ENTRIES_AT) / 8;
/// The log is sealed into a batch once it holds this many entries per allocation group (on
/// average this many frees share each count block's write), or [`MIN_BATCH`] on a small
/// store. Space held: 16 of a group's 1,020 blocks (1.6%), up to twice that before the
/// background steps hurry ([`free_log_behind`]).
pub const FREES_PER_GROUP: u64 = 16;
/// The smallest log that is sealed without a drain.
pub const MIN_BATCH: u64 = 64;

const BELOW_AT: usize = META_HEADER_LEN;
const COUNT_AT: usize = META_HEADER_LEN + 8;
const TOTAL_AT: usize = META_HEADER_LEN + 16;
const ENTRIES_AT: usize = META_HEADER_LEN + 24;

/// Free-log blocks.
pub static FREE_LOG_KIND: MetaKind = MetaKind {
    name: "free-log",
    seal: |b, a| seal_meta(b, FREE_LOG_MAGIC, a),
    verify: |b, a| {
        verify_meta(b, FREE_LOG_MAGIC, a)?;
        let count = count_of(b);
        if count > FREE_LOG_ENTRIES {
            return Err(format!("holds {count} entries, more than the {FREE_LOG_ENTRIES} that fit"));
        }
        if read_u64(b, TOTAL_AT) < count as u64 {
            return Err(format!("says {} entries down to the bottom but holds {count}", read_u64(b, TOTAL_AT)));
        }
        Ok(())
    },
};

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn count_of(b: &[u8]) -> usize {
    u32::from_le_bytes([b[COUNT_AT], b[COUNT_AT + 1], b[COUNT_AT + 2], b[COUNT_AT + 3]]) as usize
}

/// One log block read: what lies below it, its entries, and the entries from it down.
struct LogBlock {
    below: BlockAddr,
    entries: Vec<BlockAddr>,
    total: u64,
}

fn read_block<M: MetaRead + ?Sized>(meta: &mut M, at: BlockAddr) -> Result<LogBlock> {
    let b = meta.read(at, &FREE_LOG_KIND)?;
    let n = count_of(b);
    Ok(LogBlock {
        below: BlockAddr(read_u64(b, BELOW_AT)),
        entries: (0..n).map(|i| BlockAddr(read_u64(b, ENTRIES_AT + i * 8))).collect(),
        total: read_u64(b, TOTAL_AT),
    })
}

/// The allocation group holding `addr`, which a log entry names: a data block inside the
/// store's groups, never a count block.
fn group_of(sb: &Superblock, addr: BlockAddr, at: BlockAddr) -> Result<u64> {
    let bad = |why: String| StoreError::Corrupt { kind: FREE_LOG_KIND.name, addr: at, reason: why };
    if addr.0 < sb.groups_start || addr.0 >= sb.end_block() {
        return Err(bad(format!("an entry names block {addr}, outside the store's groups")));
    }
    let offset = addr.0 - sb.groups_start;
    if offset.is_multiple_of(GROUP_BLOCKS) {
        return Err(bad(format!("an entry names block {addr}, a reference-count block")));
    }
    Ok(offset / GROUP_BLOCKS)
}

/// Frees waiting in the log (not yet sealed into a batch).
pub fn free_log_len<M: MetaRead + ?Sized>(meta: &mut M) -> Result<u64> {
    let top = BlockAddr(meta.user(FREE_LOG_SLOT));
    if top.is_none() {
        return Ok(0);
    }
    Ok(read_block(meta, top)?.total)
}

/// Frees logged and not applied yet: the log's, plus a batch being applied counted whole (its
/// entries are applied a window of groups at a time).
pub fn pending_frees<M: MetaRead + ?Sized>(meta: &mut M) -> Result<u64> {
    let batch = BlockAddr(meta.user(FREE_BATCH_SLOT));
    let in_batch = if batch.is_none() || meta.user(FREE_BATCH_CURSOR_SLOT) == CURSOR_DONE {
        0
    } else {
        read_block(meta, batch)?.total
    };
    Ok(free_log_len(meta)? + in_batch)
}

/// True while a sealed batch is being applied.
pub fn batch_active<M: MetaRead + ?Sized>(meta: &M) -> bool {
    meta.user(FREE_BATCH_SLOT) != 0
}

/// The log length at which it is sealed into a batch without a drain.
fn seal_at(sb: &Superblock) -> u64 {
    (sb.groups * FREES_PER_GROUP).max(MIN_BATCH)
}

/// Hands the caller's reference to data block `block` to the free log; the reference is dropped
/// when a batch applies it. Returns the blocks freed now: 0, or on a store too full for another
/// log block, what dropping the reference at once freed (0 or 1).
pub fn log_free(meta: &mut Meta, block: BlockAddr) -> Result<u64> {
    group_of(meta.superblock(), block, block)?;
    let top = BlockAddr(meta.user(FREE_LOG_SLOT));
    let (top, total) = if top.is_none() {
        (None, 0)
    } else {
        let b = meta.read(top, &FREE_LOG_KIND)?;
        (Some(top).filter(|_| count_of(b) < FREE_LOG_ENTRIES), read_u64(b, TOTAL_AT))
    };
    let top = match top {
        Some(t) => t,
        None => {
            let fresh = match meta.alloc_meta(&FREE_LOG_KIND) {
                Ok(a) => a,
                // A full store: drop the reference now, as without the log.
                Err(StoreError::NoSpace { .. }) => return Ok(u64::from(meta.decref(block)? == 0)),
                Err(e) => return Err(e),
            };
            let below = meta.user(FREE_LOG_SLOT);
            let b = meta.write(fresh, &FREE_LOG_KIND)?;
            b[META_HEADER_LEN..].fill(0);
            b[BELOW_AT..BELOW_AT + 8].copy_from_slice(&below.to_le_bytes());
            b[TOTAL_AT..TOTAL_AT + 8].copy_from_slice(&total.to_le_bytes());
            meta.set_user(FREE_LOG_SLOT, fresh.0)?;
            fresh
        }
    };
    let b = meta.write(top, &FREE_LOG_KIND)?;
    let n = count_of(b);
    b[ENTRIES_AT + n * 8..ENTRIES_AT + n * 8 + 8].copy_from_slice(&block.0.to_le_bytes());
    b[COUNT_AT..COUNT_AT + 4].copy_from_slice(&(n as u32 + 1).to_le_bytes());
    b[TOTAL_AT..TOTAL_AT + 8].copy_from_slice(&(total + 1).to_le_bytes());
    Ok(0)
}

/// How much of the free log [`apply_step`] works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeMode {
    /// Seal the log only once it is long enough that a batch shares each count block's write
    /// among many frees ([`FREES_PER_GROUP`]): the background reclaimer's mode.
    Batched,
    /// Apply everything logged (a `vdi` command run without parallaxd, a store short of
    /// space, an idle reclaimer).
    Drain,
}

/// What an [`apply_step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Blocks freed (their count reached zero).
    pub freed: u64,
    /// True if there is more to do in this mode.
    pub more: bool,
}

/// True if the free log falls behind: a second batch's worth is logged while one is still
/// being applied (or waits to be sealed). Background steps then go on until it catches up,
/// rather than applying one window per step of the release queue.
pub fn free_log_behind(meta: &mut Meta) -> Result<bool> {
    let bound = seal_at(meta.superblock());
    Ok(pending_frees(meta)? >= 2 * bound)
}

/// True if [`apply_step`] has work to do in `mode`.
pub fn has_free_work(meta: &mut Meta, mode: FreeMode) -> Result<bool> {
    if batch_active(meta) {
        return Ok(true);
    }
    let len = free_log_len(meta)?;
    Ok(match mode {
        FreeMode::Batched => len >= seal_at(meta.superblock()),
        FreeMode::Drain => len > 0,
    })
}

/// Applies a bounded part of the free log in the open transaction: seals the log into a batch
/// when `mode` says it is time, then drops the batch's references for a window of allocation
/// groups (each group's count block written once for all of its frees) or frees the blocks of
/// a finished batch, until about `budget` metadata blocks have changed.
pub fn apply_step(meta: &mut Meta, budget: usize, mode: FreeMode) -> Result<Applied> {
    let mut freed = 0;
    if !batch_active(meta) {
        if meta.user(FREE_BATCH_CURSOR_SLOT) != 0 {
            return Err(StoreError::Damaged("the free log has a batch cursor but no batch (run `vdi check`)".into()));
        }
        if !has_free_work(meta, mode)? {
            return Ok(Applied { freed, more: false });
        }
        // Seal: the log becomes the batch, and frees from now on start a new log.
        drop(meta.take_derived::<BatchIndex>());
        let log = meta.user(FREE_LOG_SLOT);
        meta.set_user(FREE_BATCH_SLOT, log)?;
        meta.set_user(FREE_LOG_SLOT, 0)?;
    }
    let window = (budget / 4).max(1) as u64;
    let mut windows = 0;
    while meta.transaction_blocks() < budget && batch_active(meta) {
        let cursor = meta.user(FREE_BATCH_CURSOR_SLOT);
        if cursor == CURSOR_DONE {
            // Every entry is applied: free the batch's blocks, top first.
            drop(meta.take_derived::<BatchIndex>());
            let top = BlockAddr(meta.user(FREE_BATCH_SLOT));
            let below = read_block(meta, top)?.below;
            meta.set_user(FREE_BATCH_SLOT, below.0)?;
            if meta.decref(top)? != 0 {
                return Err(StoreError::Damaged(format!("free-log block {top} has more than one reference")));
            }
            if below.is_none() {
                meta.set_user(FREE_BATCH_CURSOR_SLOT, 0)?;
            }
            continue;
        }
        if windows == 1 && mode == FreeMode::Batched {
            // One window per step: a batch's count blocks spread over the commits of many
            // steps instead of landing in one (a burst that held guests' flushes back).
            break;
        }
        windows += 1;
        let index = batch_index(meta)?;
        let groups = meta.superblock().groups;
        let group = |a: BlockAddr| index.group(a);
        // The window starts at the first group at or after the cursor that has entries, so
        // groups with nothing to apply cost nothing.
        let from = index.sorted.partition_point(|&a| group(a) < cursor);
        let (to, next) = match index.sorted.get(from) {
            None => (from, CURSOR_DONE),
            Some(&first) => {
                let end = group(first).saturating_add(window).min(groups);
                let to = index.sorted.partition_point(|&a| group(a) < end);
                (to, if to == index.sorted.len() { CURSOR_DONE } else { end })
            }
        };
        // Sorted, so each count block is opened once and in order.
        for &e in &index.sorted[from..to] {
            freed += u64::from(meta.decref(e)? == 0);
        }
        meta.put_derived(index);
        meta.set_user(FREE_BATCH_CURSOR_SLOT, next)?;
    }
    let more = has_free_work(meta, mode)?;
    Ok(Applied { freed, more })
}

/// The entries of the batch being applied, sorted by address (so by group), read from its
/// blocks once per batch and kept with the metadata's derived state: a window then costs what
/// it applies, not a scan of the batch. The batch's blocks do not change while it is applied
/// (only the cursor moves), the index is dropped when a batch is sealed or finished, and a
/// rollback drops it with the rest of the derived state.
struct BatchIndex {
    /// The batch's top block when the index was built.
    top: BlockAddr,
    /// Every entry, sorted.
    sorted: Vec<BlockAddr>,
    /// `groups_start` of the store, to find an entry's group.
    groups_start: u64,
}

impl BatchIndex {
    /// The group of an entry (checked against the store's groups when the index was built).
    fn group(&self, a: BlockAddr) -> u64 {
        (a.0 - self.groups_start) / GROUP_BLOCKS
    }
}

/// The index of the batch now being applied: the one kept, or read from the batch's blocks.
fn batch_index(meta: &mut Meta) -> Result<Box<BatchIndex>> {
    let top = BlockAddr(meta.user(FREE_BATCH_SLOT));
    if let Some(index) = meta.take_derived::<BatchIndex>()
        && index.top == top
    {
        return Ok(index);
    }
    let sb = meta.superblock().clone();
    let mut sorted = Vec::new();
    let mut at = top;
    for _ in 0..=sb.end_block() {
        if at.is_none() {
            break;
        }
        let block = read_block(meta, at)?;
        for &e in &block.entries {
            group_of(&sb, e, at)?;
        }
        sorted.extend_from_slice(&block.entries);
        at = block.below;
    }
    if !at.is_none() {
        return Err(StoreError::Damaged("the free log's batch loops".into()));
    }
    sorted.sort_unstable();
    Ok(Box::new(BatchIndex { top, sorted, groups_start: sb.groups_start }))
}

/// What [`visit_free_log`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeLogItem {
    /// A block of the log or of the batch (one reference).
    LogBlock(BlockAddr),
    /// A block a log or batch entry still holds one reference to.
    Held(BlockAddr),
}

/// Calls `f` for every free-log and batch block and every reference their entries still hold,
/// for checkers; checks each block's running total and that neither stack loops. Returns the
/// number of references held.
pub fn visit_free_log<M: MetaRead + ?Sized>(meta: &mut M, f: &mut dyn FnMut(FreeLogItem)) -> Result<u64> {
    let sb = meta.superblock().clone();
    let cursor = meta.user(FREE_BATCH_CURSOR_SLOT);
    let batch = BlockAddr(meta.user(FREE_BATCH_SLOT));
    if batch.is_none() && cursor != 0 {
        return Err(StoreError::Damaged(format!("the free log's batch cursor is {cursor} with no batch")));
    }
    let mut held = 0;
    for (top, live_from) in [(BlockAddr(meta.user(FREE_LOG_SLOT)), 0), (batch, cursor)] {
        let mut at = top;
        let mut steps = 0u64;
        while !at.is_none() {
            steps += 1;
            if steps > sb.end_block() {
                return Err(StoreError::Damaged("the free log loops".into()));
            }
            f(FreeLogItem::LogBlock(at));
            let block = read_block(meta, at)?;
            let below_total = if block.below.is_none() { 0 } else { read_block(meta, block.below)?.total };
            if block.total != below_total + block.entries.len() as u64 {
                return Err(StoreError::Corrupt {
                    kind: FREE_LOG_KIND.name,
                    addr: at,
                    reason: format!(
                        "says {} entries down to the bottom, but holds {} over {below_total}",
                        block.total,
                        block.entries.len()
                    ),
                });
            }
            for &e in &block.entries {
                if group_of(&sb, e, at)? >= live_from {
                    held += 1;
                    f(FreeLogItem::Held(e));
                }
            }
            at = block.below;
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};

    use super::*;

    fn store(max_blocks: u64) -> BlockStore {
        let create = CreateOptions { journal_slot_blocks: 256, max_blocks };
        BlockStore::create(Arc::new(MemBackend::new()), &create, &OpenOptions::default()).unwrap()
    }

    /// `n` data blocks, each with count 1, committed.
    fn data_blocks(s: &BlockStore, n: usize) -> Vec<BlockAddr> {
        let blocks = s.with_transaction(|t| (0..n).map(|_| t.alloc_data()).collect::<Result<Vec<_>>>()).unwrap();
        s.commit().unwrap();
        blocks
    }

    /// (log and batch blocks, references held) as a checker sees them.
    fn visit(s: &BlockStore) -> (Vec<BlockAddr>, Vec<BlockAddr>) {
        let (mut blocks, mut held) = (Vec::new(), Vec::new());
        let n = visit_free_log(&mut *s.lock(), &mut |i| match i {
            FreeLogItem::LogBlock(a) => blocks.push(a),
            FreeLogItem::Held(a) => held.push(a),
        })
        .unwrap();
        assert_eq!(n as usize, held.len());
        held.sort_unstable();
        (blocks, held)
    }

    fn counts(s: &BlockStore, blocks: &[BlockAddr]) -> Vec<u32> {
        let mut m = s.lock();
        blocks.iter().map(|&b| m.refcount(b).unwrap()).collect()
    }

    #[test]
    fn a_logged_free_keeps_its_count_until_a_drain_applies_it() {
        let s = store(0);
        let blocks = data_blocks(&s, 2500);
        let allocated = s.lock().space().allocated;
        let freed = s.with_transaction(|t| blocks.iter().map(|&b| log_free(t, b)).sum::<Result<u64>>()).unwrap();
        assert_eq!(freed, 0, "nothing is freed while logged");
        assert!(counts(&s, &blocks).iter().all(|&c| c == 1), "a logged block keeps its count");
        let (log_blocks, held) = visit(&s);
        assert_eq!(log_blocks.len(), 2500usize.div_ceil(FREE_LOG_ENTRIES));
        assert_eq!(held, blocks, "every entry holds its block's reference");
        assert_eq!(free_log_len(&mut *s.lock()).unwrap(), 2500);
        assert_eq!(s.lock().space().allocated, allocated + log_blocks.len() as u64);

        let mut total = 0;
        loop {
            let a = s.with_transaction(|t| apply_step(t, 2, FreeMode::Drain)).unwrap();
            s.commit().unwrap();
            total += a.freed;
            if !a.more {
                break;
            }
        }
        assert_eq!(total, 2500);
        assert!(counts(&s, &blocks).iter().all(|&c| c == 0));
        assert_eq!(visit(&s), (vec![], vec![]), "the batch's blocks are freed too");
        assert_eq!(s.lock().space().allocated, allocated - 2500);
        let m = s.lock();
        assert_eq!((m.user(FREE_BATCH_SLOT), m.user(FREE_BATCH_CURSOR_SLOT)), (0, 0));
    }

    #[test]
    fn a_batch_applies_the_groups_below_its_cursor_and_new_frees_wait_for_the_next() {
        let s = store(0);
        let blocks = data_blocks(&s, 3000);
        let groups = s.lock().superblock().groups;
        assert!(groups >= 3, "{groups} groups");
        let group = |b: BlockAddr| group_of(s.lock().superblock(), b, b).unwrap();
        let (early, late) = blocks.split_at(2970);
        s.with_transaction(|t| early.iter().try_for_each(|&b| log_free(t, b).map(drop))).unwrap();
        // A budget of 1 is one window of one group.
        let a = s.with_transaction(|t| apply_step(t, 1, FreeMode::Batched)).unwrap();
        assert!(a.more && a.freed > 0, "{a:?}");
        assert_eq!(s.lock().user(FREE_BATCH_CURSOR_SLOT), 1);
        // Frees logged now go to a new log, not into the batch being applied.
        s.with_transaction(|t| late.iter().try_for_each(|&b| log_free(t, b).map(drop))).unwrap();
        assert_eq!(free_log_len(&mut *s.lock()).unwrap(), 30);
        let (_, held) = visit(&s);
        let want: Vec<BlockAddr> =
            early.iter().copied().filter(|&b| group(b) >= 1).chain(late.iter().copied()).collect();
        let mut want = want;
        want.sort_unstable();
        assert_eq!(held, want, "held: the batch's groups from the cursor on, and the new log");
        for (b, c) in early.iter().zip(counts(&s, early)) {
            assert_eq!(c, u32::from(group(*b) >= 1), "block {b} in group {}", group(*b));
        }
        // Below the bound the new log waits; the batch finishes.
        while s.with_transaction(|t| apply_step(t, 2, FreeMode::Batched)).unwrap().more {}
        assert!(counts(&s, early).iter().all(|&c| c == 0));
        assert!(counts(&s, late).iter().all(|&c| c == 1), "30 frees on {groups} groups wait for more");
        let (log_blocks, held) = visit(&s);
        assert_eq!((log_blocks.len(), held.len()), (1, 30));
    }

    #[test]
    fn a_window_starts_at_the_next_group_with_entries() {
        let s = store(0);
        let blocks = data_blocks(&s, 3000);
        let groups = s.lock().superblock().groups;
        let group = |b: BlockAddr| group_of(s.lock().superblock(), b, b).unwrap();
        let last: Vec<BlockAddr> = blocks.iter().copied().filter(|&b| group(b) == groups - 1).collect();
        assert!(!last.is_empty() && groups >= 3, "{groups} groups");
        s.with_transaction(|t| last.iter().try_for_each(|&b| log_free(t, b).map(drop))).unwrap();
        // One window of one group from cursor 0, in a step that applies one window: it goes
        // straight to the last group.
        assert!(last.len() as u64 >= seal_at(s.lock().superblock()));
        let a = s.with_transaction(|t| apply_step(t, 1, FreeMode::Batched)).unwrap();
        assert_eq!(a.freed, last.len() as u64, "{a:?}");
        assert_eq!(s.lock().user(FREE_BATCH_CURSOR_SLOT), CURSOR_DONE);
        assert!(counts(&s, &last).iter().all(|&c| c == 0));
    }

    #[test]
    fn a_rolled_back_window_is_applied_again_from_the_blocks() {
        let s = store(0);
        let blocks = data_blocks(&s, 2500);
        s.with_transaction(|t| blocks.iter().try_for_each(|&b| log_free(t, b).map(drop))).unwrap();
        let failed: Result<()> = s.with_transaction(|t| {
            apply_step(t, 1, FreeMode::Drain)?;
            Err(StoreError::Damaged("an error later in the step".into()))
        });
        assert!(failed.is_err());
        assert!(counts(&s, &blocks).iter().all(|&c| c == 1), "the window rolled back");
        while s.with_transaction(|t| apply_step(t, 1, FreeMode::Drain)).unwrap().more {}
        assert!(counts(&s, &blocks).iter().all(|&c| c == 0));
        assert_eq!(visit(&s), (vec![], vec![]));
    }

    #[test]
    fn batched_mode_seals_the_log_only_at_its_bound() {
        let s = store(0);
        let blocks = data_blocks(&s, 10);
        let bound = seal_at(s.lock().superblock());
        let groups = s.lock().superblock().groups;
        assert_eq!(bound, MIN_BATCH.max(groups * FREES_PER_GROUP));
        let blocks = [blocks, data_blocks(&s, bound as usize - 10)].concat();
        let (first, last) = blocks.split_at(blocks.len() - 1);
        s.with_transaction(|t| first.iter().try_for_each(|&b| log_free(t, b).map(drop))).unwrap();
        let a = s.with_transaction(|t| apply_step(t, 48, FreeMode::Batched)).unwrap();
        assert_eq!(a, Applied { freed: 0, more: false }, "one short of the bound");
        s.with_transaction(|t| log_free(t, last[0]).map(drop)).unwrap();
        let a = s.with_transaction(|t| apply_step(t, 48, FreeMode::Batched)).unwrap();
        assert_eq!(a.freed, bound, "at the bound the whole log is applied");
        // The batch's own block may wait for the next step (a step's budget counts freed blocks).
        if a.more {
            let a = s.with_transaction(|t| apply_step(t, 48, FreeMode::Batched)).unwrap();
            assert_eq!(a, Applied { freed: 0, more: false });
        }
        assert_eq!(visit(&s), (vec![], vec![]));
    }

    #[test]
    fn a_store_too_full_for_a_log_block_frees_at_once() {
        let probe = store(0);
        let limit = probe.lock().superblock().groups_start + 2 * GROUP_BLOCKS;
        let s = store(limit);
        let mut blocks = Vec::new();
        loop {
            match s.with_transaction(|t| t.alloc_data()) {
                Ok(b) => blocks.push(b),
                Err(StoreError::NoSpace { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        s.commit().unwrap();
        assert_eq!(s.with_transaction(|t| log_free(t, blocks[0])).unwrap(), 1, "freed at once");
        assert_eq!(counts(&s, &blocks[..1]), [0]);
        assert_eq!(visit(&s), (vec![], vec![]));
    }

    #[test]
    fn an_entry_naming_a_count_block_is_damage() {
        let s = store(0);
        let blocks = data_blocks(&s, 1);
        s.with_transaction(|t| log_free(t, blocks[0]).map(drop)).unwrap();
        let count_block = BlockAddr(s.lock().superblock().groups_start);
        assert!(s.with_transaction(|t| log_free(t, count_block)).is_err());
        let top = BlockAddr(s.lock().user(FREE_LOG_SLOT));
        s.with_transaction(|t| {
            let b = t.write(top, &FREE_LOG_KIND)?;
            b[ENTRIES_AT..ENTRIES_AT + 8].copy_from_slice(&count_block.0.to_le_bytes());
            Ok(())
        })
        .unwrap();
        let err = visit_free_log(&mut *s.lock(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("reference-count block"), "{err}");
    }
}
