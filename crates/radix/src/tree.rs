//! Tree operations: lookup, copy-on-write mapping, unmap, fork, release, walks and diff.

use blockstore::{BlockAddr, Meta, MetaRead, Result, StoreError};

use crate::node::{ENTRIES, Entry, LEVELS, NODE_KIND, Node};

/// Virtual blocks one tree addresses (2³⁶: 256 TiB of 4 KiB blocks).
pub const MAX_BLOCKS: u64 = 1 << (9 * LEVELS);

/// Where a virtual block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing is mapped: the block reads as zeros.
    Unmapped,
    /// Mapped to `addr`; `writable` is true when every entry on the path has its writable bit
    /// set, i.e. the block may be overwritten in place.
    Mapped {
        /// The store block holding the data.
        addr: BlockAddr,
        /// True if this tree alone owns the block.
        writable: bool,
    },
}

/// A run of consecutive virtual blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First virtual block.
    pub start: u64,
    /// Number of blocks.
    pub len: u64,
}

/// Blocks one entry at `level` covers.
fn span(level: u32) -> u64 {
    1u64 << (9 * level)
}

fn index(vblock: u64, level: u32) -> usize {
    ((vblock >> (9 * level)) & (ENTRIES as u64 - 1)) as usize
}

fn check_vblock(vblock: u64) -> Result<()> {
    if vblock >= MAX_BLOCKS {
        return Err(StoreError::Damaged(format!("virtual block {vblock} is beyond the tree's {MAX_BLOCKS} blocks")));
    }
    Ok(())
}

/// The radix node at `addr`, checked to be of `level` (where the tree says it must be).
pub(crate) fn node_at<M: MetaRead + ?Sized>(meta: &mut M, addr: BlockAddr, level: u32) -> Result<&blockstore::Block> {
    let b = meta.read(addr, &NODE_KIND)?;
    if Node::level(b) != level {
        return Err(StoreError::Corrupt {
            kind: NODE_KIND.name,
            addr,
            reason: format!("node has level {} where level {level} belongs", Node::level(b)),
        });
    }
    Ok(b)
}

fn read_node<M: MetaRead + ?Sized>(meta: &mut M, addr: BlockAddr, level: u32) -> Result<Box<blockstore::Block>> {
    Ok(Box::new(*node_at(meta, addr, level)?))
}

fn entry_at(meta: &mut Meta, node: BlockAddr, level: u32, i: usize) -> Result<Entry> {
    Ok(Node::entry(node_at(meta, node, level)?, i))
}

fn set_entry(meta: &mut Meta, node: BlockAddr, i: usize, e: Entry) -> Result<()> {
    let b = meta.write(node, &NODE_KIND)?;
    Node::set_entry(b, i, e);
    Ok(())
}

fn new_node(meta: &mut Meta, level: u32) -> Result<BlockAddr> {
    let a = meta.alloc_meta(&NODE_KIND)?;
    Node::init(meta.write(a, &NODE_KIND)?, level);
    Ok(a)
}

/// Creates an empty tree; returns its root (owned by the caller, reference count 1).
pub fn create(meta: &mut Meta) -> Result<BlockAddr> {
    new_node(meta, LEVELS - 1)
}

/// Finds where `vblock` lives. Reads only cached or on-disk nodes; changes nothing.
pub fn lookup(meta: &mut Meta, root: BlockAddr, vblock: u64) -> Result<Mapping> {
    check_vblock(vblock)?;
    let mut node = root;
    let mut writable = true;
    for level in (0..LEVELS).rev() {
        let e = entry_at(meta, node, level, index(vblock, level))?;
        if e.is_empty() {
            return Ok(Mapping::Unmapped);
        }
        writable &= e.writable;
        if level == 0 {
            return Ok(Mapping::Mapped { addr: e.addr, writable });
        }
        node = e.addr;
    }
    Ok(Mapping::Unmapped)
}

/// A block of the allocation group most of the data under `vblock`'s leaf lives in (`group_of`
/// names a block's group), or `None` if the leaf does not exist or maps nothing. New data for
/// that leaf placed there keeps a later copy of the leaf's counts in few count blocks. Reads
/// only; changes nothing.
pub fn leaf_home(
    meta: &mut Meta,
    root: BlockAddr,
    vblock: u64,
    group_of: impl Fn(BlockAddr) -> Option<u64>,
) -> Result<Option<BlockAddr>> {
    check_vblock(vblock)?;
    let mut node = root;
    for level in (1..LEVELS).rev() {
        let e = entry_at(meta, node, level, index(vblock, level))?;
        if e.is_empty() {
            return Ok(None);
        }
        node = e.addr;
    }
    let leaf = node_at(meta, node, 0)?;
    // A few candidate groups with their tallies is enough: a leaf's data sits in few groups.
    let mut tally: [(u64, u32, BlockAddr); 8] = [(u64::MAX, 0, BlockAddr(0)); 8];
    for k in 0..ENTRIES {
        let e = Node::entry(leaf, k);
        let Some(g) = (!e.is_empty()).then(|| group_of(e.addr)).flatten() else { continue };
        match tally.iter_mut().find(|t| t.0 == g) {
            Some(t) => t.1 += 1,
            None => {
                if let Some(t) = tally.iter_mut().min_by_key(|t| t.1)
                    && t.1 == 0
                {
                    *t = (g, 1, e.addr);
                }
            }
        }
    }
    Ok(tally.iter().filter(|t| t.1 > 0).max_by_key(|t| t.1).map(|t| t.2))
}

/// Makes the child behind entry `i` of private node `parent` (at `level`) private too: claims it
/// if nothing else references it, copies it otherwise. Returns the private child.
fn make_child_private(meta: &mut Meta, parent: BlockAddr, level: u32, i: usize) -> Result<BlockAddr> {
    let e = entry_at(meta, parent, level, i)?;
    let child_level = level - 1;
    if e.is_empty() {
        let n = new_node(meta, child_level)?;
        set_entry(meta, parent, i, Entry { addr: n, writable: true })?;
        return Ok(n);
    }
    if e.writable {
        // Invariant: a writable entry on a private path names a block this tree alone owns.
        let count = meta.refcount(e.addr)?;
        if count != 1 {
            return Err(StoreError::Damaged(format!(
                "writable entry {i} of node {parent} names node {} whose reference count is {count}, not 1",
                e.addr
            )));
        }
        // Invariant: a leaf with a linked copy never changes (crate::chain), so no tree
        // reaches one through writable entries.
        if child_level == 0 && crate::chain::with_chains_ref(meta, |_, ch| Ok(ch.copy(e.addr).is_some()))? {
            return Err(StoreError::Damaged(format!(
                "writable entry {i} of node {parent} names leaf {}, which has a linked copy",
                e.addr
            )));
        }
        return Ok(e.addr);
    }
    if meta.refcount(e.addr)? == 1 {
        if child_level == 0 && crate::chain::with_chains_ref(meta, |_, ch| Ok(ch.copy(e.addr).is_some()))? {
            // A leaf with a linked copy never changes (crate::chain): copy it, counting the
            // copy's references (the leaf has its one linked copy), and free it.
            let old = read_node(meta, e.addr, child_level)?;
            let copy = meta.alloc_meta_near(&NODE_KIND, e.addr)?;
            let fresh = shared_copy(meta, &old, child_level)?;
            *meta.write(copy, &NODE_KIND)? = *fresh;
            set_entry(meta, parent, i, Entry { addr: copy, writable: true })?;
            release_node(meta, e.addr, child_level)?;
            return Ok(copy);
        }
        // Only we reference it now, so we may take it over instead of copying (safe for
        // metadata, which changes atomically at commit). Its own writable bits date from before
        // it was shared and may be stale — a copy made meanwhile added references to its
        // children — so clear them all: each child is then checked when first written.
        read_node(meta, e.addr, child_level)?;
        let b = meta.write(e.addr, &NODE_KIND)?;
        for k in 0..ENTRIES {
            let ce = Node::entry(b, k);
            if ce.writable {
                Node::set_entry(b, k, Entry { addr: ce.addr, writable: false });
            }
        }
        set_entry(meta, parent, i, Entry { addr: e.addr, writable: true })?;
        return Ok(e.addr);
    }
    let old = read_node(meta, e.addr, child_level)?;
    let copy = meta.alloc_meta_near(&NODE_KIND, e.addr)?;
    let fresh = if child_level == 0 {
        // A leaf copy is linked to its source instead of counting its 512 references, when
        // the source has no linked copy yet (crate::chain).
        let (fresh, children) = uncounted_copy(&old, child_level);
        if !crate::chain::with_chains(meta, |m, ch| ch.link(m, copy, e.addr))? {
            meta.incref_all(&children)?;
        }
        fresh
    } else {
        shared_copy(meta, &old, child_level)?
    };
    *meta.write(copy, &NODE_KIND)? = *fresh;
    meta.decref(e.addr)?;
    set_entry(meta, parent, i, Entry { addr: copy, writable: true })?;
    Ok(copy)
}

/// Maps `vblock` to data block `addr` (whose reference the tree takes over), copying shared
/// nodes on the path first. Returns the data block previously mapped there, whose reference
/// has been dropped (it may now be free).
pub fn map(meta: &mut Meta, root: BlockAddr, vblock: u64, addr: BlockAddr) -> Result<Option<BlockAddr>> {
    check_vblock(vblock)?;
    // Invariant: a block being mapped is allocated to the caller and was not freed meanwhile.
    if meta.refcount(addr)? != 1 || meta.is_pending_free(addr) {
        return Err(StoreError::Damaged(format!("mapping block {addr}, which is not a freshly allocated block")));
    }
    let mut node = root;
    for level in (1..LEVELS).rev() {
        node = make_child_private(meta, node, level, index(vblock, level))?;
    }
    let i = index(vblock, 0);
    let old = entry_at(meta, node, 0, i)?;
    if old.writable && meta.refcount(old.addr)? != 1 {
        return Err(StoreError::Damaged(format!("writable leaf entry names shared data block {}", old.addr)));
    }
    set_entry(meta, node, i, Entry { addr, writable: true })?;
    if old.is_empty() {
        Ok(None)
    } else {
        crate::chain::with_chains_ref(meta, |m, ch| ch.drop_ref(m, node, i, old.addr))?;
        Ok(Some(old.addr))
    }
}

/// The contents of a copy of node `old` (at `level`) that shares its children: every entry
/// with its writable bit clear, every child one reference richer (count blocks opened once
/// each, not once per child).
fn shared_copy(meta: &mut Meta, old: &blockstore::Block, level: u32) -> Result<Box<blockstore::Block>> {
    let (fresh, children) = uncounted_copy(old, level);
    meta.incref_all(&children)?;
    Ok(fresh)
}

/// A copy of node `old` with every writable bit clear, and the children it names; no count is
/// changed.
fn uncounted_copy(old: &blockstore::Block, level: u32) -> (Box<blockstore::Block>, Vec<BlockAddr>) {
    let mut fresh = Box::new([0u8; blockstore::BLOCK_SIZE]);
    Node::init(&mut fresh, level);
    let mut children = Vec::with_capacity(ENTRIES);
    for k in 0..ENTRIES {
        let e = Node::entry(old, k);
        if !e.is_empty() {
            children.push(e.addr);
            Node::set_entry(&mut fresh, k, Entry { addr: e.addr, writable: false });
        }
    }
    (fresh, children)
}

/// Drops one reference to data block `addr`, held by a leaf outside any chain (or taken out
/// of its chain); returns 1 if that freed it.
fn release_data(meta: &mut Meta, addr: BlockAddr) -> Result<u64> {
    Ok(u64::from(meta.decref(addr)? == 0))
}

/// Drops one reference to the tree at `root` and frees every block only it referenced, in one
/// transaction. Time and metadata changed are proportional to what the tree alone owned, so
/// this is for small trees; [`crate::defer_release`] releases a tree of any size in bounded
/// steps. Returns the blocks freed.
pub fn release(meta: &mut Meta, root: BlockAddr) -> Result<u64> {
    release_node(meta, root, LEVELS - 1)
}

fn release_node(meta: &mut Meta, addr: BlockAddr, level: u32) -> Result<u64> {
    if meta.refcount(addr)? > 1 {
        meta.decref(addr)?;
        return Ok(0);
    }
    if level == 0 {
        // Its references that are not its own, or pass to a copy, are cleared first.
        crate::chain::with_chains(meta, |m, ch| ch.unchain(m, addr))?;
    }
    let node = read_node(meta, addr, level)?;
    meta.decref(addr)?;
    let mut freed = 1;
    for k in 0..ENTRIES {
        let e = Node::entry(&node, k);
        if e.is_empty() {
            continue;
        }
        freed += if level == 0 { release_data(meta, e.addr)? } else { release_node(meta, e.addr, level - 1)? };
    }
    Ok(freed)
}

/// A new root sharing everything `root` maps: a copy of the root with every writable bit clear,
/// each child gaining a reference. This is how snapshots and clones start. Cost: one node.
pub fn fork(meta: &mut Meta, root: BlockAddr) -> Result<BlockAddr> {
    let old = read_node(meta, root, LEVELS - 1)?;
    let fresh = shared_copy(meta, &old, LEVELS - 1)?;
    let copy = new_node(meta, LEVELS - 1)?;
    *meta.write(copy, &NODE_KIND)? = *fresh;
    Ok(copy)
}

/// Unmaps every virtual block in `[start, end)`. Subtrees wholly inside the range are handed to
/// the release queue without being read or copied. Returns the data blocks freed at once.
pub fn unmap(meta: &mut Meta, root: BlockAddr, start: u64, end: u64) -> Result<u64> {
    let end = end.min(MAX_BLOCKS);
    if start >= end {
        return Ok(0);
    }
    unmap_in(meta, root, LEVELS - 1, 0, start, end)
}

fn unmap_in(meta: &mut Meta, node: BlockAddr, level: u32, base: u64, start: u64, end: u64) -> Result<u64> {
    let s = span(level);
    let first = ((start.max(base) - base) / s) as usize;
    let last = ((end.min(base + s * ENTRIES as u64) - base - 1) / s) as usize;
    let mut freed = 0;
    for i in first..=last {
        let e = entry_at(meta, node, level, i)?;
        if e.is_empty() {
            continue;
        }
        let cbase = base + i as u64 * s;
        let whole = start <= cbase && cbase + s <= end;
        if level == 0 {
            set_entry(meta, node, i, Entry::EMPTY)?;
            freed += u64::from(crate::chain::with_chains_ref(meta, |m, ch| ch.drop_ref(m, node, i, e.addr))?);
        } else if whole {
            // A whole subtree goes to the release queue: a discard of any length changes a
            // bounded number of blocks now, and the subtree is freed in bounded steps later.
            set_entry(meta, node, i, Entry::EMPTY)?;
            crate::reclaim::defer_node(meta, e.addr, level - 1)?;
        } else {
            if !any_mapped(meta, e.addr, level - 1, cbase, start, end)? {
                continue;
            }
            let child = make_child_private(meta, node, level, i)?;
            freed += unmap_in(meta, child, level - 1, cbase, start, end)?;
            if Node::is_empty(meta.read(child, &NODE_KIND)?) {
                set_entry(meta, node, i, Entry::EMPTY)?;
                freed += release_node(meta, child, level - 1)?;
            }
        }
    }
    Ok(freed)
}

fn any_mapped<M: MetaRead + ?Sized>(
    meta: &mut M,
    node: BlockAddr,
    level: u32,
    base: u64,
    start: u64,
    end: u64,
) -> Result<bool> {
    let mut found = false;
    walk(meta, node, level, base, start, end, &mut |_, _| {
        found = true;
        false
    })?;
    Ok(found)
}

/// Calls `f(vblock, data_addr)` for mapped blocks in order until it returns false.
/// Returns false if stopped early.
fn walk<M: MetaRead + ?Sized>(
    meta: &mut M,
    node: BlockAddr,
    level: u32,
    base: u64,
    start: u64,
    end: u64,
    f: &mut dyn FnMut(u64, BlockAddr) -> bool,
) -> Result<bool> {
    let s = span(level);
    if end <= base || start >= base + s * ENTRIES as u64 {
        return Ok(true);
    }
    let first = ((start.max(base) - base) / s) as usize;
    let last = ((end.min(base + s * ENTRIES as u64) - base - 1) / s) as usize;
    let n = read_node(meta, node, level)?;
    for i in first..=last {
        let e = Node::entry(&n, i);
        if e.is_empty() {
            continue;
        }
        let cbase = base + i as u64 * s;
        let go_on = if level == 0 { f(cbase, e.addr) } else { walk(meta, e.addr, level - 1, cbase, start, end, f)? };
        if !go_on {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The mapped runs of virtual blocks in `[start, end)`, in order, adjacent blocks merged.
pub fn mapped_runs<M: MetaRead + ?Sized>(meta: &mut M, root: BlockAddr, start: u64, end: u64) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    walk(meta, root, LEVELS - 1, 0, start, end.min(MAX_BLOCKS), &mut |v, _| {
        match runs.last_mut() {
            Some(r) if r.start + r.len == v => r.len += 1,
            _ => runs.push(Run { start: v, len: 1 }),
        }
        true
    })?;
    Ok(runs)
}

/// The runs of virtual blocks whose mapping differs between trees `a` and `b`, in order.
/// Subtrees the two trees share are skipped unread, so the cost follows the changed part.
pub fn diff<M: MetaRead + ?Sized>(meta: &mut M, a: BlockAddr, b: BlockAddr) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut push = |v: u64, len: u64| match runs.last_mut() {
        Some(r) if r.start + r.len == v => r.len += len,
        _ => runs.push(Run { start: v, len }),
    };
    diff_nodes(meta, Some(a), Some(b), LEVELS - 1, 0, &mut push)?;
    Ok(runs)
}

fn diff_nodes<M: MetaRead + ?Sized>(
    meta: &mut M,
    a: Option<BlockAddr>,
    b: Option<BlockAddr>,
    level: u32,
    base: u64,
    push: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let na = match a {
        Some(x) => Some(read_node(meta, x, level)?),
        None => None,
    };
    let nb = match b {
        Some(x) => Some(read_node(meta, x, level)?),
        None => None,
    };
    let s = span(level);
    for i in 0..ENTRIES {
        let ea = na.as_ref().map(|n| Node::entry(n, i)).filter(|e| !e.is_empty()).map(|e| e.addr);
        let eb = nb.as_ref().map(|n| Node::entry(n, i)).filter(|e| !e.is_empty()).map(|e| e.addr);
        if ea == eb {
            continue;
        }
        let cbase = base + i as u64 * s;
        if level == 0 {
            push(cbase, 1);
        } else {
            diff_nodes(meta, ea, eb, level - 1, cbase, push)?;
        }
    }
    Ok(())
}

/// What [`visit_nodes`] reports for each block reachable from a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// A node at a level; its entries are reported next unless the callback returned false.
    Node {
        /// The node.
        addr: BlockAddr,
        /// Its level.
        level: u32,
    },
    /// A data block referenced from a leaf.
    Data {
        /// The data block.
        addr: BlockAddr,
    },
}

/// Walks the tree at `root` depth first, calling `f` for every node and every data reference.
/// When `f` returns false for a node, its children are skipped (visit shared nodes once).
pub fn visit_nodes<M: MetaRead + ?Sized>(
    meta: &mut M,
    root: BlockAddr,
    f: &mut dyn FnMut(Visit) -> bool,
) -> Result<()> {
    visit(meta, root, LEVELS - 1, f)
}

/// Walks the children of node `addr` (at `level`) from entry `from` on, as [`visit_nodes`]
/// does below a node; the node itself is not reported. For a node the release queue has half
/// released.
pub fn visit_nodes_from<M: MetaRead + ?Sized>(
    meta: &mut M,
    addr: BlockAddr,
    level: u32,
    from: usize,
    f: &mut dyn FnMut(Visit) -> bool,
) -> Result<()> {
    visit_children(meta, addr, level, from, f)
}

fn visit<M: MetaRead + ?Sized>(
    meta: &mut M,
    addr: BlockAddr,
    level: u32,
    f: &mut dyn FnMut(Visit) -> bool,
) -> Result<()> {
    if !f(Visit::Node { addr, level }) {
        return Ok(());
    }
    visit_children(meta, addr, level, 0, f)
}

fn visit_children<M: MetaRead + ?Sized>(
    meta: &mut M,
    addr: BlockAddr,
    level: u32,
    from: usize,
    f: &mut dyn FnMut(Visit) -> bool,
) -> Result<()> {
    if level >= LEVELS {
        return Err(StoreError::Damaged(format!("node {addr} queued with level {level}")));
    }
    let n = read_node(meta, addr, level)?;
    for i in from..ENTRIES {
        let e = Node::entry(&n, i);
        if e.is_empty() {
            continue;
        }
        if level == 0 {
            f(Visit::Data { addr: e.addr });
        } else {
            visit(meta, e.addr, level - 1, f)?;
        }
    }
    Ok(())
}

/// Calls `f` for every node and data block reached from `root` through writable entries only:
/// the blocks written in place, which must each have reference count 1.
pub fn visit_writable<M: MetaRead + ?Sized>(meta: &mut M, root: BlockAddr, f: &mut dyn FnMut(BlockAddr)) -> Result<()> {
    visit_writable_in(meta, root, LEVELS - 1, f)
}

fn visit_writable_in<M: MetaRead + ?Sized>(
    meta: &mut M,
    addr: BlockAddr,
    level: u32,
    f: &mut dyn FnMut(BlockAddr),
) -> Result<()> {
    let n = read_node(meta, addr, level)?;
    for i in 0..ENTRIES {
        let e = Node::entry(&n, i);
        if e.is_empty() || !e.writable {
            continue;
        }
        f(e.addr);
        if level > 0 {
            visit_writable_in(meta, e.addr, level - 1, f)?;
        }
    }
    Ok(())
}

/// Space a tree maps, and how much of it only this tree references.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Data blocks the tree maps (shared ones included).
    pub mapped: u64,
    /// Of those, blocks no other tree references: every node on the path and the data block
    /// itself have reference count 1. Deleting the tree frees exactly these (and its own
    /// nodes).
    pub exclusive: u64,
}

/// [`Usage`] of the tree at `root`: one walk, reading a reference count per node and per data
/// block under an unshared node (below a shared node nothing is exclusive).
pub fn usage<M: MetaRead + ?Sized>(meta: &mut M, root: BlockAddr) -> Result<Usage> {
    let chains = crate::chain::Chains::load(meta)?;
    usage_with(meta, &chains, root)
}

/// [`usage`] with the store's chains already read ([`crate::Chains::load`] on the same
/// metadata), for callers reporting many trees.
pub fn usage_with<M: MetaRead + ?Sized>(meta: &mut M, chains: &crate::chain::Chains, root: BlockAddr) -> Result<Usage> {
    let mut u = Usage::default();
    let shared = meta.refcount(root)? > 1;
    // A data block named by several leaves of a chain is shared whatever its stored count.
    usage_in(meta, chains, root, LEVELS - 1, shared, &mut u)?;
    Ok(u)
}

fn usage_in<M: MetaRead + ?Sized>(
    meta: &mut M,
    chains: &crate::chain::Chains,
    addr: BlockAddr,
    level: u32,
    shared: bool,
    u: &mut Usage,
) -> Result<()> {
    let n = read_node(meta, addr, level)?;
    for i in 0..ENTRIES {
        let e = Node::entry(&n, i);
        if e.is_empty() {
            continue;
        }
        let below_shared = shared || meta.refcount(e.addr)? > 1;
        if level == 0 {
            let shared_in_chain = !below_shared && chains.shares(meta, addr, i, e.addr)?;
            u.mapped += 1;
            u.exclusive += u64::from(!below_shared && !shared_in_chain);
        } else {
            usage_in(meta, chains, e.addr, level - 1, below_shared, u)?;
        }
    }
    Ok(())
}
