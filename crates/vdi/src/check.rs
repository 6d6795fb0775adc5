//! The full consistency check: every reachable block counted exactly, nothing leaked, every
//! metadata block's checksum valid.

use std::collections::BTreeMap;

use rustc_hash::FxHashSet as HashSet;

use blockstore::{BlockAddr, MetaRead};
use radix::Visit;

use crate::registry::{Registry, load_state};
use crate::{Result, VdiId};

/// One thing wrong with the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Problem {
    /// A metadata block could not be read or failed its checksum.
    Damaged {
        /// What was being read when the damage was found.
        context: String,
        /// The store's description of the damage.
        detail: String,
    },
    /// A block's stored reference count differs from the references found.
    WrongCount {
        /// The block.
        block: u64,
        /// Count stored.
        stored: u32,
        /// References found.
        found: u32,
    },
    /// A block is referenced but marked free.
    Unallocated {
        /// The block.
        block: u64,
        /// References found.
        found: u32,
    },
    /// A block is marked in use but nothing references it.
    Leaked {
        /// The block.
        block: u64,
        /// Count stored.
        stored: u32,
    },
    /// A block reached from a live VDI through writable entries only — so written in place —
    /// is shared: its writes would show in another tree.
    SharedWritable {
        /// The block.
        block: u64,
        /// Its reference count (should be 1).
        count: u32,
        /// The VDI.
        vdi: u32,
    },
    /// A snapshot's id is not below the store's snapshot-id counter: the counter could hand
    /// the same id to another snapshot.
    SnapshotIdAhead {
        /// The snapshot.
        snapshot: u64,
        /// The counter (the lowest id not yet handed out).
        next: u64,
    },
    /// The superblock's count of allocated blocks is wrong.
    AllocatedCount {
        /// Count in the superblock.
        stored: u64,
        /// Blocks with a non-zero count.
        found: u64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Damaged { context, detail } => write!(f, "{context}: {detail}"),
            Problem::WrongCount { block, stored, found } => {
                write!(f, "block {block}: reference count is {stored} but {found} references were found")
            }
            Problem::Unallocated { block, found } => {
                write!(f, "block {block}: in use ({found} references) but marked free")
            }
            Problem::Leaked { block, stored } => {
                write!(f, "block {block}: marked in use (count {stored}) but nothing references it (leaked)")
            }
            Problem::SharedWritable { block, count, vdi } => write!(
                f,
                "block {block}: VDI {vdi} reaches it through writable entries (written in place) but its reference count is {count}, not 1"
            ),
            Problem::SnapshotIdAhead { snapshot, next } => write!(
                f,
                "snapshot {snapshot}: the store's snapshot-id counter is {next}, so a new snapshot could get the same id"
            ),
            Problem::AllocatedCount { stored, found } => {
                write!(f, "superblock says {stored} blocks are allocated, the counts say {found}")
            }
        }
    }
}

/// What [`Registry::check`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// VDIs checked.
    pub vdis: usize,
    /// Snapshots checked (not deleted).
    pub snapshots: usize,
    /// Distinct radix nodes visited.
    pub nodes: u64,
    /// Distinct data blocks referenced.
    pub data_blocks: u64,
    /// Entries in the release queue (deleted trees not yet freed).
    pub pending_reclaim: u64,
    /// Problems found, in words.
    pub problems: Vec<Problem>,
    /// Problems repaired (with `repair`).
    pub repaired: usize,
}

impl CheckReport {
    /// True if nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// References found per block: a dense array over the store's blocks (a check of a store with
/// millions of mapped blocks adds tens of millions of references; an ordered map made that
/// most of the check's time), plus an ordered map for addresses outside the store, which
/// only damage produces.
struct Tally {
    base: u64,
    counts: Vec<u32>,
    outside: BTreeMap<u64, u32>,
}

impl Tally {
    /// For blocks `base..end`.
    fn new(base: u64, end: u64) -> Self {
        Tally { base, counts: vec![0; end.saturating_sub(base) as usize], outside: BTreeMap::new() }
    }

    fn add(&mut self, addr: u64) {
        match addr.checked_sub(self.base).and_then(|i| self.counts.get_mut(i as usize)) {
            Some(c) => *c = c.saturating_add(1),
            None => *self.outside.entry(addr).or_default() += 1,
        }
    }

    /// Takes back one reference [`Tally::add`] counted.
    fn sub(&mut self, addr: u64) {
        match addr.checked_sub(self.base).and_then(|i| self.counts.get_mut(i as usize)) {
            Some(c) => *c = c.saturating_sub(1),
            None => {
                if let Some(c) = self.outside.get_mut(&addr) {
                    *c = c.saturating_sub(1);
                    if *c == 0 {
                        self.outside.remove(&addr);
                    }
                }
            }
        }
    }

    fn get(&self, addr: u64) -> u32 {
        match addr.checked_sub(self.base).and_then(|i| self.counts.get(i as usize)) {
            Some(&c) => c,
            None => self.outside.get(&addr).copied().unwrap_or(0),
        }
    }

    /// Every block with references, in address order.
    fn nonzero(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let below = self.outside.range(..self.base).map(|(a, c)| (*a, *c));
        let inside = self.counts.iter().enumerate().filter(|(_, c)| **c != 0).map(|(i, c)| (self.base + i as u64, *c));
        let above = self.outside.range(self.base..).map(|(a, c)| (*a, *c));
        below.chain(inside).chain(above)
    }
}

/// Runs a tree walk that counts one reference for every node and data-block entry it meets,
/// walking below each node only the first time it is seen.
fn count_refs(
    found: &mut Tally,
    seen: &mut HashSet<u64>,
    walk: impl FnOnce(&mut dyn FnMut(Visit) -> bool) -> blockstore::Result<()>,
) -> blockstore::Result<()> {
    walk(&mut |v| match v {
        Visit::Node { addr, .. } => {
            found.add(addr.0);
            seen.insert(addr.0)
        }
        Visit::Data { addr } => {
            found.add(addr.0);
            true
        }
    })
}

fn q_ok(report: &CheckReport) -> bool {
    !report.problems.iter().any(|p| matches!(p, Problem::Damaged { context, .. } if context == "release queue"))
}

/// What one walk of the metadata found.
struct Audit {
    report: CheckReport,
    /// Counts to set (a leak: 0) to make the stored counts match the references found.
    fixes: Vec<(BlockAddr, u32)>,
    /// True if the fixes are certain: every tree was read and no referenced block is free.
    repairable: bool,
    /// The snapshot-id counter to set, if it is behind an id in use.
    next_snapshot: Option<u64>,
}

/// Walks the metadata `meta` (a frozen view, or a transaction for repair) and compares the
/// references found with the stored counts.
fn audit<M: MetaRead + ?Sized>(meta: &mut M, progress: &mut dyn FnMut(u64, u64)) -> Result<Audit> {
    let mut report = CheckReport::default();
    // Re-read the registry from the store itself, not from memory.
    let disk_state = match load_state(&mut *meta) {
        Ok(s) => Some(s),
        Err(e) => {
            report.problems.push(Problem::Damaged { context: "VDI registry".into(), detail: e.to_string() });
            None
        }
    };
    let mut found = Tally::new(meta.superblock().groups_start, meta.superblock().end_block());
    let mut seen_nodes: HashSet<u64> = HashSet::default();
    let mut readable = disk_state.is_some();
    let mut next_snapshot = None;
    if let Some(state) = &disk_state {
        report.vdis = state.vdis.len();
        for (id, why) in &state.damaged {
            readable = false;
            report.problems.push(Problem::Damaged { context: format!("VDI {id}"), detail: why.clone() });
        }
        for b in &state.registry_blocks {
            found.add(b.0);
        }
        let mut roots: Vec<(String, BlockAddr)> = Vec::new();
        for (id, v) in &state.vdis {
            found.add(v.record.0);
            for b in v.log.iter().chain(&v.name_blocks) {
                found.add(b.0);
            }
            roots.push((
                format!("VDI {id} ('{}')", v.name),
                BlockAddr(v.live.root.load(std::sync::atomic::Ordering::Acquire)),
            ));
            if !v.pending_root.is_none() {
                roots.push((format!("VDI {id} (interrupted import)"), v.pending_root));
            }
        }
        let counter = meta.user(crate::disk::USER_NEXT_SNAPSHOT).max(1);
        if let Some((highest, _)) = state.snaps.iter().max_by_key(|(sid, _)| **sid)
            && highest.0 >= counter
        {
            report.problems.push(Problem::SnapshotIdAhead { snapshot: highest.0, next: counter });
            next_snapshot = Some(highest.0 + 1);
        }
        for (sid, s) in &state.snaps {
            if !s.deleted {
                report.snapshots += 1;
                roots.push((format!("snapshot {sid} of VDI {}", s.vdi), s.root));
            }
        }
        // The release queue holds one reference per queue block and per entry; a node it has
        // begun to release still references its children from the cursor on.
        let mut queued: Vec<(BlockAddr, u32, usize)> = Vec::new();
        let mut entries = 0u64;
        let q = radix::visit_queue(&mut *meta, &mut |item| match item {
            radix::QueueItem::QueueBlock(a) => found.add(a.0),
            radix::QueueItem::Entry(radix::Queued::Block(a)) => {
                entries += 1;
                found.add(a.0);
            }
            radix::QueueItem::Entry(radix::Queued::Node { addr, level, cursor }) => {
                entries += 1;
                found.add(addr.0);
                queued.push((addr, level, cursor));
            }
        });
        if let Err(e) = q {
            readable = false;
            report.problems.push(Problem::Damaged { context: "release queue".into(), detail: e.to_string() });
        }
        report.pending_reclaim = radix::queue_len(&*meta);
        if q_ok(&report) && entries != report.pending_reclaim {
            report.problems.push(Problem::Damaged {
                context: "release queue".into(),
                detail: format!("holds {entries} entries but its length says {}", report.pending_reclaim),
            });
        }
        let queued_leaves: Vec<(BlockAddr, usize)> =
            queued.iter().filter(|q| q.1 == 0).map(|&(addr, _, cursor)| (addr, cursor)).collect();
        for (addr, level, cursor) in queued {
            if cursor == 0 && !seen_nodes.insert(addr.0) {
                continue;
            }
            seen_nodes.insert(addr.0);
            let walked = count_refs(&mut found, &mut seen_nodes, |f| {
                radix::visit_nodes_from(&mut *meta, addr, level, cursor, f)
            });
            if let Err(e) = walked {
                readable = false;
                report.problems.push(Problem::Damaged {
                    context: format!("queued release of node {addr}"),
                    detail: e.to_string(),
                });
            }
        }
        // The chain table: its blocks hold one reference each; its links must join live
        // leaves, and the references they leave uncounted are subtracted after the walks.
        let chains = match radix::Chains::load(&mut *meta) {
            Ok(c) => Some(c),
            Err(e) => {
                readable = false;
                report.problems.push(Problem::Damaged { context: "chain table".into(), detail: e.to_string() });
                None
            }
        };
        if let Some(ch) = &chains {
            for b in ch.table_blocks() {
                found.add(b.0);
            }
        }
        let mut writable_paths: Vec<(VdiId, BlockAddr)> = Vec::new();
        for (id, v) in &state.vdis {
            writable_paths.push((*id, BlockAddr(v.live.root.load(std::sync::atomic::Ordering::Acquire))));
        }
        for (id, root) in writable_paths {
            let mut private: Vec<u64> = Vec::new();
            if radix::visit_writable(&mut *meta, root, &mut |a| private.push(a.0)).is_ok() {
                for a in private {
                    match meta.refcount(BlockAddr(a)) {
                        Ok(1) => {}
                        Ok(count) => report.problems.push(Problem::SharedWritable { block: a, count, vdi: id.0 }),
                        Err(e) => report.problems.push(Problem::Damaged {
                            context: format!("reference count of block {a}"),
                            detail: e.to_string(),
                        }),
                    }
                }
            }
        }
        let total = roots.len() as u64;
        for (done, (what, root)) in roots.into_iter().enumerate() {
            progress(done as u64, total);
            let walked = count_refs(&mut found, &mut seen_nodes, |f| radix::visit_nodes(&mut *meta, root, f));
            if let Err(e) = walked {
                readable = false;
                report.problems.push(Problem::Damaged { context: what, detail: e.to_string() });
            }
        }
        progress(total, total);
        if let Some(ch) = &chains {
            for (copy, source) in ch.links() {
                for end in [copy, source] {
                    if !seen_nodes.contains(&end.0) {
                        // The references the link leaves uncounted cannot be told: no repair.
                        readable = false;
                        report.problems.push(Problem::Damaged {
                            context: "chain table".into(),
                            detail: format!("the link of {copy} to {source} names node {end}, which no tree reaches"),
                        });
                    }
                }
            }
            for (addr, cursor) in &queued_leaves {
                if *cursor > 0 && ch.is_chained(*addr) {
                    readable = false;
                    report.problems.push(Problem::Damaged {
                        context: "chain table".into(),
                        detail: format!("leaf {addr} is half released by the queue but still in a chain"),
                    });
                }
            }
            match radix::uncounted_refs(&mut *meta, ch) {
                Ok(refs) => {
                    for (_, b) in refs {
                        found.sub(b.0);
                    }
                }
                Err(e) => {
                    readable = false;
                    report.problems.push(Problem::Damaged { context: "chain table".into(), detail: e.to_string() });
                }
            }
        }
    }
    report.nodes = seen_nodes.len() as u64;
    report.data_blocks = found.nonzero().filter(|(k, _)| !seen_nodes.contains(k)).count() as u64;
    let stored = match meta.all_refcounts() {
        Ok(s) => s,
        Err(e) => {
            report.problems.push(Problem::Damaged { context: "reference counts".into(), detail: e.to_string() });
            return Ok(Audit { report, fixes: Vec::new(), repairable: false, next_snapshot });
        }
    };
    let allocated = stored.len() as u64;
    if meta.superblock().allocated != allocated {
        report.problems.push(Problem::AllocatedCount { stored: meta.superblock().allocated, found: allocated });
    }
    let mut fixes: Vec<(BlockAddr, u32)> = Vec::new();
    // `stored` is in address order.
    let stored_count = |block: u64| stored.binary_search_by_key(&block, |(a, _)| a.0).ok().map(|i| stored[i].1);
    for (block, n) in found.nonzero() {
        match stored_count(block) {
            None => report.problems.push(Problem::Unallocated { block, found: n }),
            Some(c) if c != n => {
                report.problems.push(Problem::WrongCount { block, stored: c, found: n });
                fixes.push((BlockAddr(block), n));
            }
            _ => {}
        }
    }
    for &(block, c) in &stored {
        if found.get(block.0) == 0 {
            report.problems.push(Problem::Leaked { block: block.0, stored: c });
            fixes.push((block, 0));
        }
    }
    let unallocated = report.problems.iter().any(|p| matches!(p, Problem::Unallocated { .. }));
    Ok(Audit { report, fixes, repairable: readable && !unallocated, next_snapshot })
}

impl Registry {
    /// Checks the whole store: walks every VDI, snapshot and registry block, counting the
    /// references to every block, and compares with the stored counts. Shared nodes are
    /// visited once.
    ///
    /// Without `repair` the check is online: it walks a [`blockstore::FrozenView`] of one
    /// instant without holding the metadata lock, so guests' I/O, snapshots, deletes and
    /// commits go on meanwhile (a view given up because the store changed too much is taken
    /// again, twice). With `repair` — which needs the store to itself, so never under
    /// parallaxd — it walks and fixes wrong counts and leaks in one transaction, and only when
    /// every tree could be read: damage is never guessed at.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        self.check_with_progress(repair, &mut |_, _| {})
    }

    /// [`Registry::check`], calling `progress(trees walked, trees)` as it goes (a view given
    /// up and taken again starts the count again).
    pub fn check_with_progress(&self, repair: bool, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        if repair {
            return self.check_and_repair(progress);
        }
        // The metadata as of now, walked without holding the metadata lock.
        self.with_view("vdi::check::frozen", |view| Ok(audit(view, progress)?.report))
    }

    /// `check(true)`: walk and repair in one transaction.
    fn check_and_repair(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        if self.has_reclaimer() {
            return Err(crate::VdiError::InUse(
                "the store (served by parallaxd; repair needs it alone: stop parallaxd, then run `vdi check --repair`)"
                    .into(),
            ));
        }
        let mut txn = self.store.begin()?;
        let Audit { mut report, fixes, repairable, next_snapshot } = audit(&mut txn, progress)?;
        let fix_counts = repairable && !fixes.is_empty();
        if fix_counts || next_snapshot.is_some() {
            if fix_counts {
                for (a, n) in &fixes {
                    txn.set_refcount(*a, *n)?;
                }
                report.repaired = fixes.len();
            }
            // Raising the counter past every id in use is always safe.
            if let Some(n) = next_snapshot {
                txn.set_user(crate::disk::USER_NEXT_SNAPSHOT, n)?;
                report.repaired += 1;
            }
            txn.finish()?;
            self.store.commit()?;
        }
        Ok(report)
    }

    /// The VDIs whose trees are damaged (and those whose records are): the daemon refuses to
    /// serve them. Walks a frozen view, so it may run beside I/O; a view given up because the
    /// store changed too much is taken again, and never counts as damage.
    pub fn damaged_vdis(&self) -> Result<Vec<(VdiId, String)>> {
        self.walk_frozen(|view, state| {
            let mut out: Vec<(VdiId, String)> = state.damaged.iter().map(|(id, why)| (*id, why.clone())).collect();
            for (id, v) in &state.vdis {
                let root = BlockAddr(v.live.root.load(std::sync::atomic::Ordering::Acquire));
                if let Err(e) = radix::visit_nodes(view, root, &mut |_| true) {
                    out.push((*id, e.to_string()));
                }
            }
            Ok(out)
        })
    }
}
