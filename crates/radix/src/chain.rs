//! Deferred leaf copies: chains, and which of their entries hold counted references.
//!
//! Copying a shared leaf used to add one reference to each of its up to 512 data blocks; with
//! a snapshot every 10 ms nearly every write copies a leaf, and retention dropped the same
//! references again a second later, so most of a commit was count blocks. A leaf copy now
//! records a *link* instead — `copy → source` in the chain table — and changes no count.
//!
//! **Chains.** A node has at most one linked copy and at most one source, so links form
//! chains: the oldest node (the *top*, which has no source) down to the newest copy. A second
//! copy of a node that already has one (a clone's or a rollback's write through an old
//! snapshot) counts its references at once, as before.
//!
//! **The rule.** Entry `k` of a chained leaf `N`, naming data block `b`, holds a *counted*
//! reference (one in `b`'s stored count) exactly when no node above `N` in its chain names `b`
//! at `k` too. Every other holder of `b` stays counted as before. So:
//! - a copy changes no count: every entry of it is named at the same slot by its source;
//! - dropping an entry that is not counted changes no count;
//! - dropping a counted entry passes the reference to the nearest node below that names the
//!   same block at the same slot (it becomes the topmost, so counted), if there is one, and
//!   only otherwise decrements the stored count ([`Chains::drop_ref`]);
//! - freeing a chained leaf first takes it out of its chain ([`Chains::unchain`]), clearing
//!   the entries whose references are not its own or pass below, and joining its copy to
//!   its source; the rest are plain counted references, released as before;
//! - cutting a chain below its top ([`Chains::materialise`]) adds a count for each block the
//!   top names whose nearest namer below becomes the new top's counted holder.
//!
//! The rule needs nothing beyond the links: a leaf entry only ever changes to a freshly
//! allocated block (which no other entry names), to empty, or is copied from its source. A
//! block's stored count is never 0 while an entry names it, so freeing at 0 stays safe.
//!
//! **A leaf with a linked copy never changes** (only the newest leaf of a chain is written):
//! a tree that would claim one copies it instead (`tree::make_child_private`). So the leaves
//! naming one block at one entry are consecutive in their chain — the block is new in the
//! first of them and each copy below inherits it until one replaces it — and each question
//! the rule asks is answered by the source or the copy alone, one node read, however long
//! the chain. `vdi check` recounts with the rule itself, walking every chain, and reports a
//! run that is not consecutive ([`uncounted_refs`]) before any count it would spoil.
//!
//! **The table** is a list of blocks (magic `CHNL`) from superblock user slot [`CHAIN_SLOT`],
//! each holding up to [`CHAIN_RECORDS`] links. It is metadata like any other: changed in the
//! transaction that copies, frees or cuts, journaled by the commit, put back by a rollback.
//! The in-memory index ([`Chains`]) is derived from it and kept in [`Meta::take_derived`].
//! From a transaction's first take it records the before-image of each change it makes, and
//! a rollback replays them ([`DerivedState::undo`]) as the blocks are put back, so a cache
//! miss retried costs no rebuild; questions that change nothing borrow it
//! ([`Meta::lend_derived`]). Chains are kept at most
//! [`MAX_CHAIN`] long and the table at most [`MAX_LINKS`] links (the oldest cut first), so
//! walks, memory and the table stay bounded whatever the retention.

use std::collections::VecDeque;

use blockstore::format::{META_HEADER_LEN, seal_meta, verify_meta};
use blockstore::{BLOCK_SIZE, BlockAddr, DerivedState, Meta, MetaKind, MetaRead, Result, StoreError};
use rustc_hash::FxHashMap as HashMap;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::node::{ENTRIES, Entry, NODE_KIND, Node};

/// Superblock user slot holding the first block of the chain table (0: no links).
pub const CHAIN_SLOT: usize = 12;
/// Magic of a chain-table block, `CHNL` on disk.
pub const CHAIN_MAGIC: u32 = u32::from_le_bytes(*b"CHNL");
/// Links one chain-table block holds.
pub const CHAIN_RECORDS: usize = (BLOCK_SIZE - 32) / 16;
/// Longest chain kept: a copy that would make a chain longer cuts its top link first.
pub const MAX_CHAIN: usize = 256;
/// Most links kept: a copy beyond it cuts the oldest link first.
pub const MAX_LINKS: usize = 32_768;

/// One link on disk: `copy` is the deferred copy of `source`. Both 0: a free record.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct LinkDisk {
    copy: U64,
    source: U64,
}

/// A chain-table block.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ChainBlockDisk {
    /// Magic, checksum and address ([`seal_meta`]).
    header: [u8; META_HEADER_LEN],
    /// The next table block (0: the last).
    next: U64,
    /// Records in use.
    count: U32,
    /// Zero.
    reserved: [u8; 4],
    records: [LinkDisk; CHAIN_RECORDS],
}
const _: () = assert!(size_of::<ChainBlockDisk>() == BLOCK_SIZE);

fn layout(b: &blockstore::Block) -> &ChainBlockDisk {
    // A block is exactly the struct's size, and the struct is unaligned.
    ChainBlockDisk::ref_from_bytes(b.as_slice()).expect("a block is one chain-table block")
}

fn layout_mut(b: &mut blockstore::Block) -> &mut ChainBlockDisk {
    ChainBlockDisk::mut_from_bytes(b.as_mut_slice()).expect("a block is one chain-table block")
}

/// Chain-table blocks.
pub static CHAIN_KIND: MetaKind = MetaKind {
    name: "chain-table",
    seal: |b, a| seal_meta(b, CHAIN_MAGIC, a),
    verify: |b, a| {
        verify_meta(b, CHAIN_MAGIC, a)?;
        let t = layout(b);
        let used = t.records.iter().filter(|r| r.copy.get() != 0).count();
        if used != t.count.get() as usize {
            return Err(format!("says it holds {} links but holds {used}", t.count.get()));
        }
        if t.records.iter().any(|r| (r.copy.get() == 0) != (r.source.get() == 0)) {
            return Err("holds a link with one end missing".into());
        }
        Ok(())
    },
};

#[derive(Debug, Clone, Copy)]
struct Link {
    source: u64,
    block: u64,
    slot: usize,
    /// Creation order, for cutting the oldest link first.
    seq: u64,
    /// Links above the copy in its chain when this link was made or last measured: at least
    /// the true number (a leaf spliced out above makes it smaller), so a chain is measured
    /// only when this says it may be too long.
    depth: usize,
}

/// The links of the chain table, indexed both ways (derived from the table's blocks).
#[derive(Debug, Default)]
pub struct Chains {
    source_of: HashMap<u64, Link>,
    copy_of: HashMap<u64, u64>,
    /// Table blocks in list order, with the links each holds.
    blocks: Vec<(u64, usize)>,
    /// Copies in the order their links were made (entries whose link is gone are skipped).
    order: VecDeque<(u64, u64)>,
    /// Never goes back, not even when a rollback undoes links: an entry of `order` left by an
    /// undone link can then never match a later link of the same copy.
    next_seq: u64,
    /// How to undo the changes made since the open transaction took the index.
    undo: Option<IndexUndo>,
    /// A rollback undid changes: in debug builds the next take checks the index against the
    /// table.
    #[cfg(debug_assertions)]
    undone: bool,
}

/// How to undo the index's changes since a transaction took it ([`DerivedState::begin`]): the
/// before-image of each change, replayed newest first by a rollback.
#[derive(Debug, Default)]
struct IndexUndo {
    /// `source_of` entries as they were before each change.
    sources: Vec<(u64, Option<Link>)>,
    /// `copy_of` entries as they were before each change.
    copies: Vec<(u64, Option<u64>)>,
    /// `blocks` as it was before its first change.
    blocks: Option<Vec<(u64, usize)>>,
    /// Entries taken from the front of `order`, in the order taken.
    popped: Vec<(u64, u64)>,
    /// `order` was compacted, which drops entries unrecorded: the index cannot be undone (it
    /// is rebuilt instead; compaction is rare).
    compacted: bool,
    /// A change failed half-way: the index stays only for the rollback to undo, never for a
    /// transaction that is kept after all.
    failed: bool,
}

impl DerivedState for Chains {
    fn begin(&mut self) {
        debug_assert!(self.undo.is_none(), "a transaction took the chain index while another's record was open");
        self.undo = Some(IndexUndo::default());
    }

    fn keep(&mut self) -> bool {
        self.undo.take().is_none_or(|u| !u.failed)
    }

    fn undo(&mut self) -> bool {
        let Some(u) = self.undo.take() else { return false };
        if u.compacted {
            return false;
        }
        for (copy, before) in u.sources.into_iter().rev() {
            put_entry(&mut self.source_of, copy, before);
        }
        for (source, before) in u.copies.into_iter().rev() {
            put_entry(&mut self.copy_of, source, before);
        }
        if let Some(blocks) = u.blocks {
            self.blocks = blocks;
        }
        // Taken from the front one by one, so put back at the front in reverse. Entries the
        // transaction pushed at the back stay, stale: their links are gone or older, and
        // `next_seq` did not go back, so they never match a link again.
        for entry in u.popped.into_iter().rev() {
            self.order.push_front(entry);
        }
        #[cfg(debug_assertions)]
        {
            self.undone = true;
        }
        true
    }
}

/// Sets `map[key]` to `value` (or with `None` removes it); returns what it was.
fn put_entry<V>(map: &mut HashMap<u64, V>, key: u64, value: Option<V>) -> Option<V> {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    }
}

fn damaged(what: String) -> StoreError {
    StoreError::Damaged(what)
}

fn leaf_entry<M: MetaRead + ?Sized>(meta: &mut M, node: u64, k: usize) -> Result<Entry> {
    Ok(Node::entry(crate::tree::node_at(meta, BlockAddr(node), 0)?, k))
}

impl Chains {
    /// Reads the chain table.
    pub fn load<M: MetaRead + ?Sized>(meta: &mut M) -> Result<Chains> {
        let mut ch = Chains::default();
        let mut at = meta.user(CHAIN_SLOT);
        let mut links = Vec::new();
        let mut visited = rustc_hash::FxHashSet::default();
        while at != 0 {
            if !visited.insert(at) {
                return Err(damaged("the chain table's list of blocks loops".into()));
            }
            let t = layout(meta.read(BlockAddr(at), &CHAIN_KIND)?);
            for (slot, r) in t.records.iter().enumerate() {
                if r.copy.get() != 0 {
                    links.push((r.copy.get(), r.source.get(), at, slot));
                }
            }
            ch.blocks.push((at, t.count.get() as usize));
            at = t.next.get();
        }
        // The order links were made in is not kept on disk; a chain's links are cut top
        // first either way, so any order that puts a source's link before its copy's does.
        links.sort_by_key(|l| l.0);
        for (copy, source, block, slot) in links {
            let corrupt =
                |why: String| StoreError::Corrupt { kind: CHAIN_KIND.name, addr: BlockAddr(block), reason: why };
            if ch.source_of.contains_key(&copy) {
                return Err(corrupt(format!("node {copy} is linked to two sources")));
            }
            if ch.copy_of.insert(source, copy).is_some() {
                return Err(corrupt(format!("node {source} has two linked copies")));
            }
            ch.source_of.insert(copy, Link { source, block, slot, seq: 0, depth: 0 });
        }
        let tops: Vec<u64> = ch.copy_of.keys().copied().filter(|s| !ch.source_of.contains_key(s)).collect();
        for top in tops {
            let mut at = top;
            let mut depth = 0;
            while let Some(&c) = ch.copy_of.get(&at) {
                let seq = ch.next_seq;
                ch.next_seq += 1;
                depth += 1;
                if let Some(l) = ch.source_of.get_mut(&c) {
                    l.seq = seq;
                    l.depth = depth;
                }
                ch.order.push_back((c, seq));
                at = c;
            }
        }
        if ch.order.len() != ch.source_of.len() {
            return Err(damaged("the chain table holds a loop of links".into()));
        }
        Ok(ch)
    }

    /// Sets (or with `None` removes) the link of `copy`, recording what it was.
    fn set_source(&mut self, copy: u64, link: Option<Link>) -> Option<Link> {
        let before = put_entry(&mut self.source_of, copy, link);
        if let Some(u) = self.undo.as_mut() {
            u.sources.push((copy, before));
        }
        before
    }

    /// Sets (or with `None` removes) the linked copy of `source`, recording what it was.
    fn set_copy(&mut self, source: u64, copy: Option<u64>) {
        let before = put_entry(&mut self.copy_of, source, copy);
        if let Some(u) = self.undo.as_mut() {
            u.copies.push((source, before));
        }
    }

    /// The list of table blocks, to change: its first change in a transaction is recorded.
    fn blocks_mut(&mut self) -> &mut Vec<(u64, usize)> {
        if let Some(u) = self.undo.as_mut()
            && u.blocks.is_none()
        {
            u.blocks = Some(self.blocks.clone());
        }
        &mut self.blocks
    }

    /// True if `self` holds the same links, in the same records and table blocks, as `other`,
    /// and its order of links names each of them (a rolled-back index against the table).
    #[cfg(debug_assertions)]
    fn same_as(&self, other: &Chains) -> bool {
        let ordered: rustc_hash::FxHashSet<u64> = self
            .order
            .iter()
            .filter(|(c, q)| self.source_of.get(c).is_some_and(|l| l.seq == *q))
            .map(|(c, _)| *c)
            .collect();
        self.source_of.len() == other.source_of.len()
            && self.source_of.iter().all(|(c, l)| {
                other.source_of.get(c).is_some_and(|o| (o.source, o.block, o.slot) == (l.source, l.block, l.slot))
            })
            && self.copy_of == other.copy_of
            && self.blocks == other.blocks
            && ordered.len() == self.source_of.len()
    }

    /// Links held.
    pub fn len(&self) -> usize {
        self.source_of.len()
    }

    /// True if no link is held.
    pub fn is_empty(&self) -> bool {
        self.source_of.is_empty()
    }

    /// Every link, as `(copy, source)`.
    pub fn links(&self) -> impl Iterator<Item = (BlockAddr, BlockAddr)> + '_ {
        self.source_of.iter().map(|(c, l)| (BlockAddr(*c), BlockAddr(l.source)))
    }

    /// The table's blocks.
    pub fn table_blocks(&self) -> impl Iterator<Item = BlockAddr> + '_ {
        self.blocks.iter().map(|(b, _)| BlockAddr(*b))
    }

    /// The node `node` was copied from, if linked.
    pub fn source(&self, node: BlockAddr) -> Option<BlockAddr> {
        self.source_of.get(&node.0).map(|l| BlockAddr(l.source))
    }

    /// The linked copy of `node`, if any.
    pub fn copy(&self, node: BlockAddr) -> Option<BlockAddr> {
        self.copy_of.get(&node.0).copied().map(BlockAddr)
    }

    /// True if `node` is in a chain.
    pub fn is_chained(&self, node: BlockAddr) -> bool {
        self.source_of.contains_key(&node.0) || self.copy_of.contains_key(&node.0)
    }

    fn step_limit(&self) -> usize {
        self.source_of.len() + 1
    }

    /// True if entry `k` of chained leaf `node`, naming `b`, holds a counted reference: no
    /// node above it in its chain names `b` at `k`. Because a leaf with a linked copy never
    /// changes, the leaves naming one block at one entry are consecutive in a chain, so only
    /// the source needs looking at.
    pub fn is_counted<M: MetaRead + ?Sized>(
        &self,
        meta: &mut M,
        node: BlockAddr,
        k: usize,
        b: BlockAddr,
    ) -> Result<bool> {
        match self.source_of.get(&node.0) {
            None => Ok(true),
            Some(l) => Ok(leaf_entry(meta, l.source, k)?.addr != b),
        }
    }

    /// The nearest node below `node` in its chain that names `b` at `k`: the one a counted
    /// reference of `node` passes to. Only the linked copy can be (see [`Chains::is_counted`]).
    pub fn heir<M: MetaRead + ?Sized>(
        &self,
        meta: &mut M,
        node: BlockAddr,
        k: usize,
        b: BlockAddr,
    ) -> Result<Option<BlockAddr>> {
        match self.copy_of.get(&node.0) {
            Some(&c) if leaf_entry(meta, c, k)?.addr == b => Ok(Some(BlockAddr(c))),
            _ => Ok(None),
        }
    }

    /// Of `pending` (entries `(k, b)` of a chained leaf), takes out and returns those that leaf
    /// `neighbour` (its source or its linked copy, if any) names too.
    fn named_by<M: MetaRead + ?Sized>(
        meta: &mut M,
        neighbour: Option<u64>,
        pending: &mut Vec<(usize, BlockAddr)>,
    ) -> Result<Vec<(usize, BlockAddr)>> {
        let mut found = Vec::new();
        if let Some(n) = neighbour {
            let other = crate::tree::node_at(meta, BlockAddr(n), 0)?;
            pending.retain(|&(k, b)| {
                let named = Node::entry(other, k).addr == b;
                if named {
                    found.push((k, b));
                }
                !named
            });
        }
        Ok(found)
    }

    /// True if entry `k` of leaf `node`, naming `b`, is one of several entries of its chain
    /// naming `b` at `k` (so `b` is shared even when its stored count is 1).
    pub fn shares<M: MetaRead + ?Sized>(&self, meta: &mut M, node: BlockAddr, k: usize, b: BlockAddr) -> Result<bool> {
        if !self.is_chained(node) {
            return Ok(false);
        }
        Ok(!self.is_counted(meta, node, k, b)? || self.heir(meta, node, k, b)?.is_some())
    }

    /// Drops the reference that entry `k` of leaf `node` holds to data block `b`, as the entry
    /// is changed or cleared (or the node freed without [`Chains::unchain`]). Returns true if
    /// that freed `b`.
    pub fn drop_ref(&self, meta: &mut Meta, node: BlockAddr, k: usize, b: BlockAddr) -> Result<bool> {
        if self.is_chained(node) && (!self.is_counted(meta, node, k, b)? || self.heir(meta, node, k, b)?.is_some()) {
            return Ok(false);
        }
        Ok(meta.decref(b)? == 0)
    }

    /// Records `copy` as the deferred copy of leaf `source`, so that making it added no
    /// reference. Returns false, changing nothing, if `source` already has a linked copy or
    /// the table has no room on a full store: the caller then counts the copy's references.
    pub fn link(&mut self, meta: &mut Meta, copy: BlockAddr, source: BlockAddr) -> Result<bool> {
        if self.copy_of.contains_key(&source.0) {
            return Ok(false);
        }
        if self.is_chained(copy) {
            return Err(damaged(format!("new leaf copy {copy} is already in a chain")));
        }
        // Keep the chain this copy joins, and the table, within their bounds. The chain is
        // walked only when its recorded depth says it may be at its bound.
        let mut depth = self.source_of.get(&source.0).map_or(0, |l| l.depth) + 1;
        if depth + 1 > MAX_CHAIN {
            let (top, len) = self.top_of(source)?;
            depth = len;
            if len >= MAX_CHAIN
                && let Some(c) = self.copy(top)
            {
                self.materialise(meta, c)?;
                depth = len - 1;
            }
        }
        // A few cuts per copy at most, so a table read over the bound (never written so)
        // comes down over several transactions rather than in one unbounded one. Stale
        // entries (links gone, or undone by a rollback) are skipped without counting: there
        // are at most as many as links plus 1,024 (compaction below).
        let mut cuts = 0;
        while self.source_of.len() >= MAX_LINKS && cuts < 8 {
            let Some((c, seq)) = self.order.pop_front() else { break };
            if let Some(u) = self.undo.as_mut() {
                u.popped.push((c, seq));
            }
            if self.source_of.get(&c).is_some_and(|l| l.seq == seq) {
                cuts += 1;
                self.materialise(meta, BlockAddr(c))?;
            }
        }
        if self.copy_of.contains_key(&source.0) {
            // Cutting made `source` the top of a chain whose copy is still linked: cannot happen
            // (only links above `source` were cut), but never link a second copy.
            return Err(damaged(format!("node {source} gained a linked copy while linking {copy}")));
        }
        let Some((block, slot)) = self.free_record(meta)? else { return Ok(false) };
        let t = layout_mut(meta.write(BlockAddr(block), &CHAIN_KIND)?);
        t.records[slot] = LinkDisk { copy: U64::new(copy.0), source: U64::new(source.0) };
        t.count = U32::new(t.count.get() + 1);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.set_source(copy.0, Some(Link { source: source.0, block, slot, seq, depth }));
        self.set_copy(source.0, Some(copy.0));
        self.order.push_back((copy.0, seq));
        if self.order.len() > 2 * self.source_of.len() + 1024 {
            // Links undone since they were made leave stale entries: drop them, so the
            // queue stays within twice the links however long the store runs.
            let live = &self.source_of;
            self.order.retain(|(c, q)| live.get(c).is_some_and(|l| l.seq == *q));
            if let Some(u) = self.undo.as_mut() {
                u.compacted = true;
            }
        }
        if let Some(e) = self.blocks_mut().iter_mut().find(|e| e.0 == block) {
            e.1 += 1;
        }
        Ok(true)
    }

    /// The top of `node`'s chain and the chain's length from the top down to `node`.
    fn top_of(&self, node: BlockAddr) -> Result<(BlockAddr, usize)> {
        let mut at = node.0;
        for len in 1..=self.step_limit() {
            match self.source_of.get(&at) {
                Some(l) => at = l.source,
                None => return Ok((BlockAddr(at), len)),
            }
        }
        Err(damaged(format!("the chain above node {node} loops")))
    }

    /// A free record: in a table block with room, else in a new block at the list's head.
    /// `None` if the store has no room for a new block.
    fn free_record(&mut self, meta: &mut Meta) -> Result<Option<(u64, usize)>> {
        let block = match self.blocks.iter().find(|e| e.1 < CHAIN_RECORDS) {
            Some(e) => e.0,
            None => {
                let fresh = match meta.alloc_meta(&CHAIN_KIND) {
                    Ok(a) => a,
                    Err(StoreError::NoSpace { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let head = meta.user(CHAIN_SLOT);
                let t = layout_mut(meta.write(fresh, &CHAIN_KIND)?);
                t.next = U64::new(head);
                t.count = U32::new(0);
                t.reserved = [0; 4];
                t.records = [LinkDisk { copy: U64::new(0), source: U64::new(0) }; CHAIN_RECORDS];
                meta.set_user(CHAIN_SLOT, fresh.0)?;
                self.blocks_mut().insert(0, (fresh.0, 0));
                fresh.0
            }
        };
        let t = layout(meta.read(BlockAddr(block), &CHAIN_KIND)?);
        let slot =
            t.records.iter().position(|r| r.copy.get() == 0).ok_or_else(|| {
                damaged(format!("chain-table block {block} has no free record though it counts fewer"))
            })?;
        Ok(Some((block, slot)))
    }

    /// Removes `copy`'s link (its record, and the block if it empties).
    fn remove_link(&mut self, meta: &mut Meta, copy: BlockAddr) -> Result<()> {
        let l = self.set_source(copy.0, None).ok_or_else(|| damaged(format!("node {copy} has no link to remove")))?;
        self.set_copy(l.source, None);
        let t = layout_mut(meta.write(BlockAddr(l.block), &CHAIN_KIND)?);
        if t.records[l.slot].copy.get() != copy.0 {
            return Err(damaged(format!("chain-table block {} does not hold the link of {copy}", l.block)));
        }
        t.records[l.slot] = LinkDisk { copy: U64::new(0), source: U64::new(0) };
        let left = t.count.get() - 1;
        t.count = U32::new(left);
        let next = t.next.get();
        let i = self
            .blocks
            .iter()
            .position(|e| e.0 == l.block)
            .ok_or_else(|| damaged(format!("chain-table block {} is not in the list", l.block)))?;
        self.blocks_mut()[i].1 = left as usize;
        if left == 0 {
            // An empty block leaves the list and is freed.
            if i == 0 {
                meta.set_user(CHAIN_SLOT, next)?;
            } else {
                let prev = self.blocks[i - 1].0;
                layout_mut(meta.write(BlockAddr(prev), &CHAIN_KIND)?).next = U64::new(next);
            }
            self.blocks_mut().remove(i);
            meta.decref(BlockAddr(l.block))?;
        }
        Ok(())
    }

    /// Points `copy`'s link at `source` instead (its record rewritten in place).
    fn relink(&mut self, meta: &mut Meta, copy: BlockAddr, source: BlockAddr) -> Result<()> {
        let l = *self.source_of.get(&copy.0).ok_or_else(|| damaged(format!("node {copy} has no link")))?;
        let t = layout_mut(meta.write(BlockAddr(l.block), &CHAIN_KIND)?);
        t.records[l.slot].source = U64::new(source.0);
        self.set_source(copy.0, Some(Link { source: source.0, ..l }));
        if self.copy_of.get(&l.source) == Some(&copy.0) {
            self.set_copy(l.source, None);
        }
        self.set_copy(source.0, Some(copy.0));
        Ok(())
    }

    /// Takes leaf `node`, about to be freed, out of its chain. Entries of it whose reference
    /// is not counted, or passes to a copy below it, are cleared in the node (their references
    /// are not its to drop); its copy is linked to its source. What is left in `node` are
    /// counted references no other node of the chain names: the caller drops them as usual.
    pub fn unchain(&mut self, meta: &mut Meta, node: BlockAddr) -> Result<()> {
        if !self.is_chained(node) {
            return Ok(());
        }
        let n = Box::new(*crate::tree::node_at(meta, node, 0)?);
        let mut pending = mapped(&n);
        // Entries its source names are not counted; counted ones its copy names pass to it.
        let mut clear = Self::named_by(meta, self.source_of.get(&node.0).map(|l| l.source), &mut pending)?;
        clear.extend(Self::named_by(meta, self.copy_of.get(&node.0).copied(), &mut pending)?);
        if !clear.is_empty() {
            let w = meta.write(node, &NODE_KIND)?;
            for (k, _) in clear {
                Node::set_entry(w, k, Entry::EMPTY);
            }
        }
        let source = self.source(node);
        let copy = self.copy(node);
        if source.is_some() {
            self.remove_link(meta, node)?;
        }
        match (copy, source) {
            (Some(c), Some(s)) => self.relink(meta, c, s)?,
            (Some(c), None) => self.remove_link(meta, c)?,
            (None, _) => {}
        }
        Ok(())
    }

    /// Cuts the link of `copy`, whose source is the top of its chain: the source keeps its
    /// counted references, and each block it names gains one count for the nearest node
    /// below that names it at the same slot (which becomes that block's counted holder).
    pub fn materialise(&mut self, meta: &mut Meta, copy: BlockAddr) -> Result<()> {
        let top = self.source(copy).ok_or_else(|| damaged(format!("node {copy} has no link to cut")))?;
        if self.source(top).is_some() {
            return Err(damaged(format!("cutting below node {top}, which is not the top of its chain")));
        }
        let n = Box::new(*crate::tree::node_at(meta, top, 0)?);
        let mut pending = mapped(&n);
        let gain: Vec<BlockAddr> = Self::named_by(meta, self.copy_of.get(&top.0).copied(), &mut pending)?
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        self.remove_link(meta, copy)?;
        meta.incref_all(&gain)
    }
}

/// The mapped entries of a leaf, as `(k, block)`.
fn mapped(n: &blockstore::Block) -> Vec<(usize, BlockAddr)> {
    (0..ENTRIES).map(|k| (k, Node::entry(n, k).addr)).filter(|(_, b)| !b.is_none()).collect()
}

/// Runs `f` with the store's chains read-only (read from the table if the index is not kept).
/// The kept index stays in place whatever `f` returns — a cache miss retried or an error
/// rolled back costs no rebuild — since `f` cannot change it. For questions, and for
/// [`Chains::drop_ref`], which changes counts but no link.
pub(crate) fn with_chains_ref<T>(meta: &mut Meta, f: impl FnOnce(&mut Meta, &Chains) -> Result<T>) -> Result<T> {
    meta.lend_derived::<Chains, _>(|meta, kept| match kept {
        Some(ch) => f(meta, ch),
        // None kept: built and kept as a change would build it.
        None => with_chains(meta, |meta, ch| f(meta, ch)),
    })
}

/// Runs `f` with the store's chains (read from the table if the index is not kept), and keeps
/// the index for the next call if `f` succeeds. If `f` fails inside a transaction that took
/// the kept index, the index stays for the rollback, which undoes its changes with the blocks'
/// (a cache miss retried costs no rebuild); any other failure drops it, and the blocks decide
/// what it is next time.
pub(crate) fn with_chains<T>(meta: &mut Meta, f: impl FnOnce(&mut Meta, &mut Chains) -> Result<T>) -> Result<T> {
    // An index left by a change that failed half-way in this transaction is kept only for
    // its rollback, never used again even if the transaction goes on: read afresh, it is no
    // longer recording, so a rollback drops it.
    let kept = meta.take_derived::<Chains>().filter(|c| !c.undo.as_ref().is_some_and(|u| u.failed));
    let mut ch = match kept {
        Some(c) => c,
        None => Box::new(Chains::load(meta)?),
    };
    #[cfg(debug_assertions)]
    if ch.undone
        && let Ok(table) = Chains::load(meta)
    {
        // (A table block not in memory under a cached-only transaction puts the check off.)
        ch.undone = false;
        assert!(ch.same_as(&table), "the chain index a rollback undid differs from the chain table");
    }
    match f(meta, &mut ch) {
        Ok(out) => {
            meta.put_derived(ch);
            Ok(out)
        }
        Err(e) => {
            if let Some(u) = ch.undo.as_mut() {
                u.failed = true;
                meta.put_derived(ch);
            }
            Err(e)
        }
    }
}

/// For checkers: the data references in chained leaves that are *not* counted, as
/// `(leaf, data block)`; a recount subtracts them from what it found in those leaves. Fails
/// with `Damaged` if the leaves naming one block at one entry are not consecutive in their
/// chain: the engine relies on that (a leaf with a linked copy never changes).
pub fn uncounted_refs<M: MetaRead + ?Sized>(meta: &mut M, chains: &Chains) -> Result<Vec<(BlockAddr, BlockAddr)>> {
    let mut out = Vec::new();
    let tops: Vec<u64> = chains.copy_of.keys().copied().filter(|s| !chains.source_of.contains_key(s)).collect();
    for top in tops {
        // Blocks named above, per slot, walking down the chain.
        let mut named: Vec<Vec<u64>> = vec![Vec::new(); ENTRIES];
        let mut at = top;
        let mut steps = 0;
        let mut prev: Option<Box<blockstore::Block>> = None;
        loop {
            let n = Box::new(*crate::tree::node_at(meta, BlockAddr(at), 0)?);
            for (k, above) in named.iter_mut().enumerate() {
                let b = Node::entry(&n, k).addr;
                if b.is_none() {
                    continue;
                }
                if above.contains(&b.0) {
                    if prev.as_ref().is_some_and(|p| Node::entry(p, k).addr != b) {
                        return Err(damaged(format!(
                            "leaf {at} names block {b} at entry {k} as a leaf above it does, but its source \
                             does not: a leaf with a linked copy was changed"
                        )));
                    }
                    out.push((BlockAddr(at), b));
                } else {
                    above.push(b.0);
                }
            }
            prev = Some(n);
            let Some(&c) = chains.copy_of.get(&at) else { break };
            at = c;
            steps += 1;
            if steps > chains.step_limit() {
                return Err(damaged(format!("the chain below node {top} loops")));
            }
        }
    }
    Ok(out)
}
