//! The VDI registry: every VDI's record and snapshot log, loaded at open and kept in memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use blockstore::{BlockAddr, BlockStore, Meta, MetaRead, StoreError};
use parking_lot::{Mutex, RwLock};
use zerocopy::FromBytes;
use zerocopy::little_endian::{U32, U64};

use crate::disk::*;
use crate::{Result, SnapshotId, VdiError, VdiId};

/// Largest VDI: what a radix tree addresses.
pub const MAX_VDI_SIZE: u64 = radix::MAX_BLOCKS * blockstore::BLOCK_SIZE as u64;

/// A VDI as `vdi list` and `vdi info` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VdiInfo {
    /// Its id.
    pub id: VdiId,
    /// Its name.
    pub name: String,
    /// Virtual size in bytes (0: not set yet).
    pub size: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// The snapshot it was created from.
    pub parent: Option<SnapshotId>,
    /// Snapshots not deleted.
    pub snapshots: usize,
    /// Root block of the live tree.
    pub root: u64,
}

/// A snapshot as `vdi snap-list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: SnapshotId,
    /// The VDI it was taken of.
    pub vdi: VdiId,
    /// When it was taken, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Root block of its tree.
    pub root: u64,
    /// The VDI's size when it was taken.
    pub size: u64,
    /// True once deleted.
    pub deleted: bool,
    /// True if a schedule took it (retention may delete it).
    pub automatic: bool,
    /// True while protected: it cannot be deleted.
    pub protected: bool,
    /// Its name, if it was given one.
    pub name: Option<String>,
}

/// What a diff or an export reads: a snapshot, or a VDI as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The live VDI.
    Vdi(VdiId),
    /// A snapshot.
    Snapshot(SnapshotId),
}

/// State shared by every open handle of one VDI.
pub(crate) struct VdiLive {
    pub(crate) id: VdiId,
    pub(crate) root: AtomicU64,
    pub(crate) size: AtomicU64,
    /// Read for data I/O; write for changes to the tree's shape (snapshot, unmap, fill).
    pub(crate) io: RwLock<()>,
    /// Orders copy-on-write of the same blocks of this VDI (and lets other blocks' go on).
    pub(crate) cow: crate::cow_locks::CowLocks,
    pub(crate) writer: AtomicBool,
    pub(crate) open: AtomicUsize,
    /// I/O counters of every handle of this VDI, since the registry was opened.
    pub(crate) stats: crate::io_stats::IoCounters,
}

#[derive(Clone)]
pub(crate) struct VdiEntry {
    pub(crate) record: BlockAddr,
    pub(crate) name: String,
    pub(crate) created_ns: u64,
    pub(crate) parent: Option<SnapshotId>,
    pub(crate) log: Vec<BlockAddr>,
    /// Blocks of the snapshot-name table, in chain order.
    pub(crate) name_blocks: Vec<BlockAddr>,
    pub(crate) pending_root: BlockAddr,
    pub(crate) live: Arc<VdiLive>,
}

#[derive(Clone)]
pub(crate) struct SnapEntry {
    pub(crate) vdi: VdiId,
    pub(crate) root: BlockAddr,
    pub(crate) time_ns: u64,
    pub(crate) size: u64,
    pub(crate) deleted: bool,
    pub(crate) automatic: bool,
    pub(crate) protected: bool,
    pub(crate) name: Option<String>,
    pub(crate) log_block: BlockAddr,
    pub(crate) slot: usize,
    pub(crate) open: Arc<AtomicUsize>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) vdis: BTreeMap<VdiId, VdiEntry>,
    pub(crate) snaps: crate::snap_table::SnapTable,
    pub(crate) registry_blocks: Vec<BlockAddr>,
    /// VDIs whose record or snapshot log could not be read, with the reason: left out of
    /// everything else (their blocks stay allocated), reported by `check`.
    pub(crate) damaged: BTreeMap<VdiId, String>,
    /// The next snapshot id to hand out: at least 1 (ids start there) and above every id in the
    /// logs, as `load_state` sets it. The superblock's `USER_NEXT_SNAPSHOT` is never below it
    /// (see `snapshot_ids`).
    pub(crate) next_snapshot: u64,
}

/// The registry state as it was before a transaction, to put back if it is rolled back: the
/// VDI maps, and the roots and sizes that open handles share. The snapshots are not copied:
/// their table journals what the transaction changes (O(changes), whatever their number).
pub(crate) struct Checkpoint {
    vdis: BTreeMap<VdiId, VdiEntry>,
    registry_blocks: Vec<BlockAddr>,
    damaged: BTreeMap<VdiId, String>,
    next_snapshot: u64,
    live: Vec<(Arc<VdiLive>, u64, u64)>,
}

impl State {
    /// What to [`State::restore`] after a rollback; starts the snapshot table's journal. End
    /// a transaction that succeeded with [`State::keep`].
    pub(crate) fn checkpoint(&mut self) -> Checkpoint {
        let live = self
            .vdis
            .values()
            .map(|v| (v.live.clone(), v.live.root.load(Ordering::Acquire), v.live.size.load(Ordering::Acquire)))
            .collect();
        self.snaps.begin();
        Checkpoint {
            vdis: self.vdis.clone(),
            registry_blocks: self.registry_blocks.clone(),
            damaged: self.damaged.clone(),
            next_snapshot: self.next_snapshot,
            live,
        }
    }

    /// Keeps what the transaction since [`State::checkpoint`] changed.
    pub(crate) fn keep(&mut self) {
        self.snaps.keep();
    }

    /// Puts the state back as it was at `checkpoint`.
    pub(crate) fn restore(&mut self, checkpoint: Checkpoint) {
        for (live, root, size) in checkpoint.live {
            live.root.store(root, Ordering::Release);
            live.size.store(size, Ordering::Release);
        }
        self.vdis = checkpoint.vdis;
        self.registry_blocks = checkpoint.registry_blocks;
        self.damaged = checkpoint.damaged;
        self.next_snapshot = checkpoint.next_snapshot;
        self.snaps.roll_back();
    }
}

/// Every VDI and snapshot in one block store.
pub struct Registry {
    pub(crate) store: Arc<BlockStore>,
    pub(crate) state: Mutex<State>,
    pub(crate) reclaim: Arc<crate::reclaim::Signal>,
    /// Wakes the background committer, if one runs ([`Registry::start_committer`]).
    pub(crate) committer: Arc<crate::committer::CommitSignal>,
    /// Signalled when a writable handle is dropped (see [`Registry::open_vdi_within`]).
    pub(crate) writer_gone: (Mutex<()>, parking_lot::Condvar),
    /// Open handles and their I/O counters.
    pub(crate) handles: crate::io_stats::Handles,
    /// Called after every registry operation that changed something ([`Registry::on_change`]).
    on_change: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// When a change to the registry becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Committed before the call returns.
    Now,
    /// Made and visible at once, durable at the store's next commit — a guest's flush, the
    /// journal filling, or the caller's own [`BlockStore::commit`]. Commits are atomic, so a
    /// crash before it loses the change whole and nothing else.
    NextCommit,
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub(crate) fn damaged(what: impl Into<String>) -> VdiError {
    VdiError::Damaged(what.into())
}

fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() || name.len() > NAME_MAX {
        "use 1 to 255 bytes"
    } else if let Some(why) = unprintable(name) {
        why
    } else if name.contains('@') {
        "'@' is not allowed: it separates a VDI from a snapshot id, as in golden@5"
    } else if name.parse::<VdiId>().is_ok() {
        "a name cannot be a number: numbers are VDI ids, so the VDI could not be named by it"
    } else {
        return Ok(());
    };
    Err(VdiError::BadName { name: name.to_string(), why })
}

/// What makes `name` unfit to show in a listing, or `None`: control characters, characters
/// that reorder how text is shown (U+202A–U+202E, U+2066–U+2069: the name could look like
/// another), or nothing but spaces. Shared by VDI and snapshot names.
pub(crate) fn unprintable(name: &str) -> Option<&'static str> {
    let reorders = |c: char| matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if name.chars().any(|c| c.is_control() || reorders(c)) {
        Some("control characters (and text-direction overrides) are not allowed")
    } else if name.trim().is_empty() {
        Some("a name cannot be only spaces")
    } else {
        None
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || size > MAX_VDI_SIZE || !size.is_multiple_of(512) {
        return Err(VdiError::BadSize(size));
    }
    Ok(())
}

impl State {
    fn name_taken(&self, name: &str, except: Option<VdiId>) -> bool {
        self.vdis.iter().any(|(id, v)| v.name == name && Some(*id) != except)
    }

    /// The live snapshot of VDI `vdi` named `name`, if any.
    pub(crate) fn snapshot_named(&self, vdi: VdiId, name: &str) -> Option<SnapshotId> {
        self.snaps.iter().find(|(_, s)| s.vdi == vdi && !s.deleted && s.name.as_deref() == Some(name)).map(|(k, _)| *k)
    }

    pub(crate) fn vdi(&self, id: VdiId) -> Result<&VdiEntry> {
        self.vdis.get(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))
    }

    pub(crate) fn snap(&self, id: SnapshotId) -> Result<&SnapEntry> {
        match self.snaps.get(&id) {
            None => Err(VdiError::UnknownSnapshot(id)),
            Some(s) if s.deleted => Err(VdiError::SnapshotDeleted(id)),
            Some(s) => Ok(s),
        }
    }
}

/// Writes a VDI's record block from its in-memory entry.
pub(crate) fn write_record(meta: &mut Meta, id: VdiId, v: &VdiEntry) -> Result<()> {
    let b = meta.write(v.record, &RECORD_KIND)?;
    let r = RecordDisk::mut_from_bytes(b.as_mut_slice()).map_err(|_| damaged("record layout"))?;
    r.id = U64::new(id.0 as u64);
    r.size = U64::new(v.live.size.load(Ordering::Acquire));
    r.root = U64::new(v.live.root.load(Ordering::Acquire));
    r.pending_root = U64::new(v.pending_root.0);
    r.created_ns = U64::new(v.created_ns);
    r.parent_snapshot = U64::new(v.parent.map_or(0, |s| s.0));
    r.log_head = U64::new(v.log.first().map_or(0, |a| a.0));
    r.log_tail = U64::new(v.log.last().map_or(0, |a| a.0));
    r.name_len = U32::new(v.name.len() as u32);
    r.flags = U32::new(0);
    r.name = [0; 256];
    r.name[..v.name.len()].copy_from_slice(v.name.as_bytes());
    r.snap_names = U64::new(v.name_blocks.first().map_or(0, |a| a.0));
    Ok(())
}

impl Registry {
    /// Loads the registry of `store` (an empty store has an empty registry). An import that a
    /// crash interrupted is rolled back here.
    pub fn open(store: Arc<BlockStore>) -> Result<Arc<Registry>> {
        let state = {
            let mut meta = store.lock();
            load_state(&mut *meta)?
        };
        let reg = Arc::new(Registry {
            store,
            state: Mutex::new(state),
            reclaim: Arc::default(),
            committer: Arc::default(),
            writer_gone: (Mutex::new(()), parking_lot::Condvar::new()),
            handles: Default::default(),
            on_change: std::sync::OnceLock::new(),
        });
        reg.drop_interrupted_imports()?;
        if !reg.store.lock().is_read_only() {
            // A spare release-queue block lets a delete work even when the store is full.
            let mut txn = reg.store.begin()?;
            match radix::ensure_spare(&mut txn) {
                Ok(()) => txn.finish()?,
                Err(e) => tracing::warn!("no spare release-queue block: {e}"),
            }
        }
        Ok(reg)
    }

    /// Sets what to call after each registry operation that changed something (a VDI or
    /// snapshot made, deleted, renamed, resized...), once it is visible and before it is
    /// committed. It is called on the operation's thread outside the registry's lock, but a
    /// snapshot calls it while the VDI's I/O is held off: it must only wake a thread, never
    /// wait or do I/O. Only the first hook set is kept: false if one was already set.
    pub fn on_change(&self, f: Box<dyn Fn() + Send + Sync>) -> bool {
        self.on_change.set(f).is_ok()
    }

    /// The block store under the registry.
    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    fn drop_interrupted_imports(&self) -> Result<()> {
        let mut st = self.state.lock();
        let pending: Vec<VdiId> = st.vdis.iter().filter(|(_, v)| !v.pending_root.is_none()).map(|(k, _)| *k).collect();
        if pending.is_empty() || self.store.lock().is_read_only() {
            return Ok(());
        }
        for id in pending {
            tracing::warn!("VDI {id}: an import was interrupted; dropping what it had written");
            let mut txn = self.store.begin()?;
            let v = st.vdis.get_mut(&id).ok_or_else(|| damaged("vdi vanished"))?;
            radix::defer_release(&mut txn, v.pending_root)?;
            let pending = std::mem::replace(&mut v.pending_root, BlockAddr::NONE);
            if let Err(e) = write_record(&mut txn, id, v).and_then(|_| Ok(txn.finish()?)) {
                v.pending_root = pending;
                return Err(e);
            }
        }
        drop(st);
        self.store.commit()?;
        Ok(())
    }

    /// Runs `f` on the locked registry state in one store transaction and commits it. If `f`
    /// fails, exactly its own changes are rolled back — while the locks are still held, so no
    /// other VDI's concurrent writes are touched — and the in-memory registry is reloaded.
    /// Every operation is bounded (large releases go to the release queue), so a transaction
    /// never outgrows the journal. For registry operations only, never on the I/O path.
    pub(crate) fn transact<T>(&self, f: impl FnMut(&mut State, &mut Meta) -> Result<T>) -> Result<T> {
        let v = self.transact_uncommitted(f)?;
        self.store.commit()?;
        Ok(v)
    }

    /// [`Registry::transact`] without the commit: the change is made and visible, and becomes
    /// durable at the caller's (or anyone's) next commit.
    ///
    /// The metadata is not read under the locks: when `f` needs a block that is not in memory,
    /// its transaction is rolled back, the registry state put back as it was, both locks
    /// dropped, the block read, and `f` run again (the last of [`blockstore::MISS_RETRIES`]
    /// attempts reads under the lock).
    pub(crate) fn transact_uncommitted<T>(&self, mut f: impl FnMut(&mut State, &mut Meta) -> Result<T>) -> Result<T> {
        // Start with room in the journal for this operation.
        if self.store.lock().should_commit() {
            self.store.commit()?;
        }
        for attempt in 0..=blockstore::MISS_RETRIES {
            let mut st = self.state.lock();
            let before = st.checkpoint();
            let mut txn = self.store.begin()?;
            txn.set_cached_only(attempt < blockstore::MISS_RETRIES);
            let out = f(&mut st, &mut txn).and_then(|v| {
                // Race tests make an operation fail here, after it changed metadata.
                test_point!("vdi::transact::before_finish", |_| Err(damaged("injected failure (test)")));
                txn.finish()?;
                Ok(v)
            });
            match out {
                Ok(v) => {
                    st.keep();
                    drop(st);
                    self.reclaim.wake_if_queued(&self.store);
                    if let Some(f) = self.on_change.get() {
                        f();
                    }
                    return Ok(v);
                }
                Err(VdiError::Store(StoreError::NotCached { addr, meta_kind, epoch })) => {
                    // The transaction was rolled back when it was dropped.
                    st.restore(before);
                    drop(st);
                    self.store.load(addr, meta_kind, epoch)?;
                }
                Err(e) => {
                    // Race tests pause here: other VDIs' writes made now must survive this failure.
                    test_point!("vdi::transact::rolled_back");
                    // The transaction was rolled back when it was dropped; the registry state
                    // goes back to match it (still under the registry lock).
                    st.restore(before);
                    return Err(e);
                }
            }
        }
        Err(damaged("a registry operation kept missing the cache"))
    }

    /// Resolves a VDI named by id ("3") or by name ("golden"). An id wins over a name.
    pub fn resolve(&self, name_or_id: &str) -> Result<VdiId> {
        let st = self.state.lock();
        if let Ok(id) = name_or_id.parse::<VdiId>()
            && st.vdis.contains_key(&id)
        {
            return Ok(id);
        }
        st.vdis
            .iter()
            .find(|(_, v)| v.name == name_or_id)
            .map(|(id, _)| *id)
            .ok_or_else(|| VdiError::UnknownVdi(name_or_id.to_string()))
    }

    /// Creates an empty VDI. Without a size it takes the size of its first import.
    pub fn create_vdi(&self, name: &str, size: Option<u64>) -> Result<VdiId> {
        check_name(name)?;
        if let Some(s) = size {
            check_size(s)?;
        }
        self.transact(|st, meta| {
            if st.name_taken(name, None) {
                return Err(VdiError::NameTaken(name.into()));
            }
            let root = radix::create(meta)?;
            add_vdi(st, meta, name, size.unwrap_or(0), root, None)
        })
    }

    /// Creates a VDI that starts as a copy of snapshot `from`, sharing all of its blocks.
    pub fn clone_snapshot(&self, name: &str, from: SnapshotId) -> Result<VdiId> {
        check_name(name)?;
        self.transact(|st, meta| {
            if st.name_taken(name, None) {
                return Err(VdiError::NameTaken(name.into()));
            }
            let (root, size) = {
                let s = st.snap(from)?;
                (s.root, s.size)
            };
            let new_root = radix::fork(meta, root)?;
            add_vdi(st, meta, name, size, new_root, Some(from))
        })
    }

    /// Every VDI, by id.
    pub fn list(&self) -> Vec<VdiInfo> {
        let st = self.state.lock();
        st.vdis.keys().filter_map(|id| info_of(&st, *id).ok()).collect()
    }

    /// One VDI.
    pub fn info(&self, id: VdiId) -> Result<VdiInfo> {
        info_of(&self.state.lock(), id)
    }

    /// VDIs whose record or snapshot log is damaged, with what is wrong: they are left out of
    /// [`Registry::list`] and cannot be opened; `check` reports them.
    pub fn damaged(&self) -> Vec<(VdiId, String)> {
        self.state.lock().damaged.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Store blocks mapped by the VDI's live tree (its used size is this × 4096).
    pub fn mapped_blocks(&self, src: Source) -> Result<u64> {
        self.walk_frozen(|view, st| mapped_in(view, root_in(st, src)?))
    }

    /// [`Registry::mapped_blocks`] of several VDIs and snapshots, all as of one instant (one
    /// frozen view): `None` for one that did not exist then (deleted meanwhile, say).
    pub fn mapped_blocks_of(&self, srcs: &[Source]) -> Result<Vec<Option<u64>>> {
        self.per_tree(srcs, |view, root| mapped_in(view, root))
    }

    /// Mapped and exclusive blocks ([`radix::Usage`]) of several VDIs and snapshots, all as of
    /// one instant: `None` for one that did not exist then. Walks every tree in full, reading
    /// reference counts: for `vdi snap-list --usage` and `vdi du`, never for a plain listing.
    pub fn usage_of(&self, srcs: &[Source]) -> Result<Vec<Option<radix::Usage>>> {
        // The chain table is read once per view for all the trees, not once per tree.
        self.walk_frozen(|view, st| {
            let chains = radix::Chains::load(&mut *view)?;
            srcs.iter()
                .map(|src| match root_in(st, *src) {
                    Ok(root) => Ok(Some(radix::usage_with(view, &chains, root)?)),
                    Err(_) => Ok(None),
                })
                .collect()
        })
    }

    /// `f` on the tree of each of `srcs`, all in one frozen view: `None` for a source that did
    /// not exist at the view's instant.
    fn per_tree<T>(
        &self,
        srcs: &[Source],
        mut f: impl FnMut(&mut blockstore::FrozenView<'_>, BlockAddr) -> Result<T>,
    ) -> Result<Vec<Option<T>>> {
        self.walk_frozen(|view, st| {
            srcs.iter()
                .map(|src| match root_in(st, *src) {
                    Ok(root) => f(view, root).map(Some),
                    Err(_) => Ok(None),
                })
                .collect()
        })
    }

    /// Runs `f` on a frozen view of the store and the registry as of the view's instant: a
    /// whole-tree walk that holds no lock, so guests' I/O goes on.
    pub(crate) fn walk_frozen<T>(
        &self,
        mut f: impl FnMut(&mut blockstore::FrozenView<'_>, &State) -> Result<T>,
    ) -> Result<T> {
        self.with_view("vdi::walk_frozen::frozen", |view| load_state(&mut *view).and_then(|st| f(view, &st)))
    }

    /// Runs `f` on a frozen view of the store; a view given up because the store changed too
    /// much is taken again (three tries), and what `f` found in it is not trusted. Race tests
    /// can pause at `point`, right after the view is taken.
    pub(crate) fn with_view<T>(
        &self,
        #[cfg_attr(not(feature = "failpoints"), allow(unused_variables))] point: &'static str,
        mut f: impl FnMut(&mut blockstore::FrozenView<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut attempt = 1;
        loop {
            let mut view = self.store.freeze()?;
            test_point!(point);
            let out = f(&mut view);
            match view.still_valid() {
                Ok(()) => return out,
                Err(e) if attempt < 3 => tracing::warn!("walking a frozen view, attempt {attempt}: {e}; again"),
                Err(e) => return Err(e.into()),
            }
            attempt += 1;
        }
    }

    /// Size in bytes of a VDI or snapshot.
    pub fn size_of(&self, src: Source) -> Result<u64> {
        let st = self.state.lock();
        Ok(match src {
            Source::Vdi(id) => st.vdi(id)?.live.size.load(Ordering::Acquire),
            Source::Snapshot(s) => st.snap(s)?.size,
        })
    }

    /// Takes a snapshot of VDI `id`: its current tree becomes the snapshot, and the VDI gets a
    /// new writable root sharing everything. Writes acknowledged before this call are in the
    /// snapshot. Costs one node and one log entry, whatever the size or snapshot count.
    pub fn snapshot(&self, id: VdiId) -> Result<SnapshotId> {
        self.snapshot_inner(id, false, None, Durability::Now)
    }

    /// [`Registry::snapshot`], giving the snapshot a name (unique among the VDI's snapshots;
    /// see [`Registry::find_snapshot`]).
    pub fn snapshot_named(&self, id: VdiId, name: &str) -> Result<SnapshotId> {
        crate::snap_names::check_snapshot_name(name)?;
        self.snapshot_inner(id, false, Some(name), Durability::Now)
    }

    /// A snapshot taken by a schedule (marked automatic), durable when `durability` says.
    /// With [`Durability::NextCommit`] it is durable at the store's next commit rather than
    /// before this returns: a schedule every 10 ms then costs no commit of its own, its
    /// snapshots riding on the commits the guests' flushes make anyway. A crash loses only
    /// such snapshots taken after the last commit, which hold nothing a flush made durable
    /// that the VDI itself does not, and never their ids (docs/design.md, "Scheduled
    /// snapshots ride on commits").
    pub fn snapshot_scheduled(&self, id: VdiId, durability: Durability) -> Result<SnapshotId> {
        self.snapshot_inner(id, true, None, durability)
    }

    fn snapshot_inner(
        &self,
        id: VdiId,
        automatic: bool,
        name: Option<&str>,
        durability: Durability,
    ) -> Result<SnapshotId> {
        let live = self.state.lock().vdi(id)?.live.clone();
        // Make room in the journal before the VDI's I/O is held off, not while.
        if self.store.lock().should_commit() {
            self.store.commit()?;
        }
        let sid = loop {
            if durability == Durability::NextCommit {
                // Its id must survive a crash that loses the snapshot (crate::snapshot_ids).
                crate::snapshot_ids::reserve(self)?;
            }
            // Wait for in-flight I/O of this VDI, and hold new I/O off while the root changes
            // in memory — not during the commit: writes after this point go to the new root,
            // and the commit below makes the snapshot and them durable together.
            let _quiet = live.io.write();
            let taken = self.transact_uncommitted(|st, meta| {
                if let Some(n) = name
                    && let Some(other) = st.snapshot_named(id, n)
                {
                    return Err(VdiError::SnapshotNameTaken { vdi: id, name: n.to_string(), other });
                }
                let sid = match durability {
                    Durability::Now => crate::snapshot_ids::hand_out_committed(st, meta)?,
                    Durability::NextCommit => match crate::snapshot_ids::hand_out_reserved(st, meta)? {
                        Some(sid) => sid,
                        // Other snapshots used the reservation up meanwhile: reserve again.
                        None => return Ok(None),
                    },
                };
                take_snapshot(st, meta, sid, id, automatic)?;
                if let Some(n) = name {
                    st.snaps.get_mut(&sid).ok_or_else(|| damaged("new snapshot vanished"))?.name = Some(n.to_string());
                    crate::snap_names::rewrite(st, meta, id)?;
                }
                Ok(Some(sid))
            })?;
            if let Some(sid) = taken {
                break sid;
            }
        };
        if durability == Durability::Now {
            self.store.commit()?;
        }
        Ok(sid)
    }

    /// Snapshots of VDI `id`, oldest first, deleted ones included.
    pub fn snapshots(&self, id: VdiId) -> Result<Vec<SnapshotInfo>> {
        let st = self.state.lock();
        st.vdi(id)?;
        Ok(st.snaps.iter().filter(|(_, s)| s.vdi == id).map(|(sid, s)| snap_info(*sid, s)).collect())
    }

    /// Every snapshot in the store, deleted ones included.
    pub fn all_snapshots(&self) -> Vec<SnapshotInfo> {
        self.state.lock().snaps.iter().map(|(sid, s)| snap_info(*sid, s)).collect()
    }

    /// One snapshot (deleted ones included).
    pub fn snapshot_info(&self, sid: SnapshotId) -> Result<SnapshotInfo> {
        let st = self.state.lock();
        st.snaps.get(&sid).map(|s| snap_info(sid, s)).ok_or(VdiError::UnknownSnapshot(sid))
    }

    /// Deletes a snapshot. VDIs cloned from it keep working. Its tree goes to the release
    /// queue and the call returns at once, whatever the snapshot's size: the blocks only it
    /// held are freed by [`Registry::reclaim_step`] (or the background reclaimer).
    pub fn delete_snapshot(&self, sid: SnapshotId) -> Result<()> {
        self.delete_snapshot_with(sid, Durability::Now)
    }

    /// [`Registry::delete_snapshot`], durable when `durability` says: a schedule's retention
    /// deletes with [`Durability::NextCommit`], as it snapshots.
    pub fn delete_snapshot_with(&self, sid: SnapshotId, durability: Durability) -> Result<()> {
        let delete = |st: &mut State, meta: &mut Meta| {
            let s = st.snap(sid)?;
            if s.open.load(Ordering::Acquire) > 0 {
                return Err(VdiError::InUse(format!("snapshot {sid}")));
            }
            if s.protected {
                return Err(VdiError::Protected(sid));
            }
            let (root, log_block, slot, vdi, named) = (s.root, s.log_block, s.slot, s.vdi, s.name.is_some());
            radix::defer_release(meta, root)?;
            mark_snap_deleted(meta, log_block, slot)?;
            if let Some(s) = st.snaps.get_mut(&sid) {
                s.deleted = true;
                s.name = None;
            }
            if named {
                crate::snap_names::rewrite(st, meta, vdi)?;
            }
            drop_dead_log_block(st, meta, vdi, log_block)?;
            Ok(())
        };
        match durability {
            Durability::Now => self.transact(delete),
            Durability::NextCommit => self.transact_uncommitted(delete),
        }
    }

    /// Deletes a VDI and all its snapshots. Like [`Registry::delete_snapshot`] it returns at
    /// once: its trees, records and logs go to the release queue, from which the blocks
    /// nothing else references are freed in bounded steps.
    pub fn delete_vdi(&self, id: VdiId) -> Result<()> {
        self.transact(|st, meta| {
            let v = st.vdi(id)?;
            if v.live.open.load(Ordering::Acquire) > 0 {
                return Err(VdiError::InUse(format!("VDI {id}")));
            }
            let busy = st.snaps.iter().any(|(_, s)| s.vdi == id && s.open.load(Ordering::Acquire) > 0);
            if busy {
                return Err(VdiError::InUse(format!("a snapshot of VDI {id}")));
            }
            if let Some((sid, _)) = st.snaps.iter().find(|(_, s)| s.vdi == id && !s.deleted && s.protected) {
                return Err(VdiError::Protected(*sid));
            }
            let v = st.vdis.remove(&id).ok_or_else(|| damaged("vdi vanished"))?;
            radix::defer_release(meta, BlockAddr(v.live.root.load(Ordering::Acquire)))?;
            if !v.pending_root.is_none() {
                radix::defer_release(meta, v.pending_root)?;
            }
            let sids: Vec<SnapshotId> = st.snaps.iter().filter(|(_, s)| s.vdi == id).map(|(k, _)| *k).collect();
            for sid in sids {
                if let Some(s) = st.snaps.remove(&sid)
                    && !s.deleted
                {
                    radix::defer_release(meta, s.root)?;
                }
            }
            for b in v.log.iter().chain(&v.name_blocks) {
                radix::defer_release_block(meta, *b)?;
            }
            radix::defer_release_block(meta, v.record)?;
            set_registry_slot(st, meta, id, BlockAddr::NONE)?;
            Ok(())
        })
    }

    /// Renames a VDI.
    pub fn rename(&self, id: VdiId, new_name: &str) -> Result<()> {
        check_name(new_name)?;
        self.transact(|st, meta| {
            if st.name_taken(new_name, Some(id)) {
                return Err(VdiError::NameTaken(new_name.into()));
            }
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            v.name = new_name.to_string();
            write_record(meta, id, v)
        })
    }

    /// The live snapshot of VDI `vdi` named `name`.
    pub fn find_snapshot(&self, vdi: VdiId, name: &str) -> Result<SnapshotId> {
        let st = self.state.lock();
        st.vdi(vdi)?;
        st.snapshot_named(vdi, name).ok_or_else(|| VdiError::UnknownSnapshotName { vdi, name: name.to_string() })
    }

    /// Names snapshot `sid` (`None`: drops its name). Names are unique among one VDI's live
    /// snapshots; a deleted snapshot cannot be named.
    pub fn name_snapshot(&self, sid: SnapshotId, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            crate::snap_names::check_snapshot_name(n)?;
        }
        self.transact(|st, meta| {
            let s = st.snap(sid)?;
            if s.deleted {
                return Err(VdiError::SnapshotDeleted(sid));
            }
            let vdi = s.vdi;
            if let Some(n) = name
                && let Some(other) = st.snapshot_named(vdi, n).filter(|o| *o != sid)
            {
                return Err(VdiError::SnapshotNameTaken { vdi, name: n.to_string(), other });
            }
            st.snaps.get_mut(&sid).ok_or_else(|| damaged("snapshot vanished"))?.name = name.map(str::to_string);
            crate::snap_names::rewrite(st, meta, vdi)
        })
    }

    /// Protects snapshot `sid` from deletion (and its VDI with it), or lifts that.
    pub fn protect_snapshot(&self, sid: SnapshotId, protect: bool) -> Result<()> {
        self.transact(|st, meta| {
            let s = st.snap(sid)?;
            if s.deleted {
                return Err(VdiError::SnapshotDeleted(sid));
            }
            let (log_block, slot) = (s.log_block, s.slot);
            let l = SnapLogDisk::mut_from_bytes(meta.write(log_block, &SNAPLOG_KIND)?.as_mut_slice())
                .map_err(|_| damaged("log layout"))?;
            let e = &mut l.entries[slot];
            if e.id.get() != sid.0 {
                return Err(damaged(format!("snapshot {sid} is not in slot {slot} of log block {log_block}")));
            }
            let f = e.flags.get();
            e.flags = U64::new(if protect { f | SNAP_PROTECTED } else { f & !SNAP_PROTECTED });
            st.snaps.get_mut(&sid).ok_or_else(|| damaged("snapshot vanished"))?.protected = protect;
            Ok(())
        })
    }

    /// Makes VDI `id` hold what its snapshot `sid` holds, size included, in O(1): the VDI
    /// gets a new tree sharing the snapshot's, and its current tree is released. The VDI keeps
    /// its id, name and snapshots. Refused while anything has the VDI open for writing.
    pub fn rollback(&self, id: VdiId, sid: SnapshotId) -> Result<()> {
        let live = self.claim_writer(id)?;
        let _quiet = live.io.write();
        self.transact(|st, meta| {
            let s = st.snap(sid)?;
            if s.deleted {
                return Err(VdiError::SnapshotDeleted(sid));
            }
            if s.vdi != id {
                return Err(VdiError::NotItsSnapshot { vdi: id, snapshot: sid, owner: s.vdi });
            }
            let (root, size) = (s.root, s.size);
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            let fresh = radix::fork(meta, root)?;
            let old = BlockAddr(v.live.root.swap(fresh.0, Ordering::AcqRel));
            v.live.size.store(size, Ordering::Release);
            write_record(meta, id, v)?;
            radix::defer_release(meta, old)?;
            Ok(())
        })
    }

    /// Changes VDI `id`'s size to `size` bytes. Growing adds space that reads as zeros;
    /// shrinking drops everything past the new end, and is refused unless `allow_shrink`.
    /// Refused while anything has the VDI open for writing.
    pub fn resize(&self, id: VdiId, size: u64, allow_shrink: bool) -> Result<()> {
        check_size(size)?;
        let live = self.claim_writer(id)?;
        let _quiet = live.io.write();
        let old = live.size.load(Ordering::Acquire);
        if size < old && !allow_shrink {
            return Err(VdiError::ShrinkRefused { vdi: id, size: old, wanted: size });
        }
        const BS: u64 = blockstore::BLOCK_SIZE as u64;
        // Past the old end, a block straddling it may hold bytes from before an earlier
        // shrink; they must read as zeros once they are inside the VDI again. Zeroed while
        // still invisible (outside the old size), so a crash at any point is harmless.
        let straddling = old / BS;
        if size > old && !old.is_multiple_of(BS) {
            let upto = size.min((straddling + 1) * BS);
            crate::io::zero_beyond_size(&self.store, &live, old, upto)?;
        }
        self.transact(|st, meta| {
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            if size < old {
                let root = BlockAddr(v.live.root.load(Ordering::Acquire));
                radix::unmap(meta, root, size.div_ceil(BS), old.div_ceil(BS))?;
            }
            v.live.size.store(size, Ordering::Release);
            write_record(meta, id, v)
        })
    }

    /// Claims VDI `id` as its one writer for an operation that replaces its contents; the
    /// claim ends when the returned guard drops.
    fn claim_writer(&self, id: VdiId) -> Result<WriterClaim<'_>> {
        let st = self.state.lock();
        let live = st.vdi(id)?.live.clone();
        if live.writer.swap(true, Ordering::AcqRel) {
            return Err(VdiError::Busy(id));
        }
        Ok(WriterClaim { reg: self, live })
    }

    /// The runs of 4 KiB blocks that differ between two snapshots or a snapshot and a VDI,
    /// as (first byte, length in bytes). Shared subtrees are skipped unread.
    pub fn diff(&self, a: Source, b: Source) -> Result<Vec<(u64, u64)>> {
        let runs = self.walk_frozen(|view, st| Ok(radix::diff(view, root_in(st, a)?, root_in(st, b)?)?))?;
        let bs = blockstore::BLOCK_SIZE as u64;
        Ok(runs.into_iter().map(|r| (r.start * bs, r.len * bs)).collect())
    }
}

/// Data blocks the tree at `root` maps.
fn mapped_in<M: MetaRead + ?Sized>(meta: &mut M, root: BlockAddr) -> Result<u64> {
    Ok(radix::mapped_runs(meta, root, 0, radix::MAX_BLOCKS)?.iter().map(|r| r.len).sum())
}

/// The root of a VDI or snapshot in `st`.
fn root_in(st: &State, src: Source) -> Result<BlockAddr> {
    Ok(match src {
        Source::Vdi(id) => BlockAddr(st.vdi(id)?.live.root.load(Ordering::Acquire)),
        Source::Snapshot(s) => st.snap(s)?.root,
    })
}

fn info_of(st: &State, id: VdiId) -> Result<VdiInfo> {
    let v = st.vdi(id)?;
    Ok(VdiInfo {
        id,
        name: v.name.clone(),
        size: v.live.size.load(Ordering::Acquire),
        created_ns: v.created_ns,
        parent: v.parent,
        snapshots: st.snaps.values().filter(|s| s.vdi == id && !s.deleted).count(),
        root: v.live.root.load(Ordering::Acquire),
    })
}

fn snap_info(id: SnapshotId, s: &SnapEntry) -> SnapshotInfo {
    SnapshotInfo {
        id,
        vdi: s.vdi,
        time_ns: s.time_ns,
        root: s.root.0,
        size: s.size,
        deleted: s.deleted,
        automatic: s.automatic,
        protected: s.protected,
        name: s.name.clone(),
    }
}

/// A VDI claimed as its one writer by a registry operation ([`Registry::rollback`],
/// [`Registry::resize`]); releases the claim when dropped.
struct WriterClaim<'a> {
    reg: &'a Registry,
    live: Arc<VdiLive>,
}

impl std::ops::Deref for WriterClaim<'_> {
    type Target = VdiLive;
    fn deref(&self) -> &VdiLive {
        &self.live
    }
}

impl Drop for WriterClaim<'_> {
    fn drop(&mut self) {
        self.live.writer.store(false, Ordering::Release);
        let _g = self.reg.writer_gone.0.lock();
        self.reg.writer_gone.1.notify_all();
    }
}

fn new_live(id: VdiId, root: BlockAddr, size: u64) -> Arc<VdiLive> {
    Arc::new(VdiLive {
        id,
        root: AtomicU64::new(root.0),
        size: AtomicU64::new(size),
        io: RwLock::new(()),
        cow: crate::cow_locks::CowLocks::new(),
        writer: AtomicBool::new(false),
        open: AtomicUsize::new(0),
        stats: Default::default(),
    })
}

fn add_vdi(
    st: &mut State,
    meta: &mut Meta,
    name: &str,
    size: u64,
    root: BlockAddr,
    parent: Option<SnapshotId>,
) -> Result<VdiId> {
    let next = meta.user(USER_NEXT_VDI);
    let id = VdiId(u32::try_from(next).map_err(|_| damaged("VDI ids exhausted"))?);
    meta.set_user(USER_NEXT_VDI, next + 1)?;
    let record = meta.alloc_meta(&RECORD_KIND)?;
    let entry = VdiEntry {
        record,
        name: name.to_string(),
        created_ns: now_ns(),
        parent,
        log: Vec::new(),
        name_blocks: Vec::new(),
        pending_root: BlockAddr::NONE,
        live: new_live(id, root, size),
    };
    write_record(meta, id, &entry)?;
    st.vdis.insert(id, entry);
    set_registry_slot(st, meta, id, record)?;
    Ok(id)
}

fn set_registry_slot(st: &mut State, meta: &mut Meta, id: VdiId, record: BlockAddr) -> Result<()> {
    let block_index = id.0 as usize / REGISTRY_SLOTS;
    while st.registry_blocks.len() <= block_index {
        let b = meta.alloc_meta(&REGISTRY_KIND)?;
        let first_id = (st.registry_blocks.len() * REGISTRY_SLOTS) as u64;
        {
            let r = RegistryDisk::mut_from_bytes(meta.write(b, &REGISTRY_KIND)?.as_mut_slice())
                .map_err(|_| damaged("registry layout"))?;
            r.first_id = U64::new(first_id);
        }
        match st.registry_blocks.last() {
            None => meta.set_user(USER_REGISTRY, b.0)?,
            Some(&prev) => {
                let r = RegistryDisk::mut_from_bytes(meta.write(prev, &REGISTRY_KIND)?.as_mut_slice())
                    .map_err(|_| damaged("registry layout"))?;
                r.next = U64::new(b.0);
            }
        }
        st.registry_blocks.push(b);
    }
    let b = st.registry_blocks[block_index];
    let r = RegistryDisk::mut_from_bytes(meta.write(b, &REGISTRY_KIND)?.as_mut_slice())
        .map_err(|_| damaged("registry layout"))?;
    r.records[id.0 as usize % REGISTRY_SLOTS] = U64::new(record.0);
    Ok(())
}

/// Makes snapshot `sid` (an id from `crate::snapshot_ids`) of VDI `id`.
pub(crate) fn take_snapshot(
    st: &mut State,
    meta: &mut Meta,
    sid: SnapshotId,
    id: VdiId,
    automatic: bool,
) -> Result<()> {
    assert!(meta.user(USER_NEXT_SNAPSHOT) > sid.0, "snapshot id {sid} handed out above the ceiling");
    let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
    let old_root = BlockAddr(v.live.root.load(Ordering::Acquire));
    let size = v.live.size.load(Ordering::Acquire);
    let new_root = radix::fork(meta, old_root)?;
    let time_ns = now_ns();
    // Append to the log's last block, or start a new block when it is full (or absent).
    let tail_full = match v.log.last() {
        None => true,
        Some(&t) => {
            SnapLogDisk::ref_from_bytes(meta.read(t, &SNAPLOG_KIND)?.as_slice())
                .map_err(|_| damaged("log layout"))?
                .count
                .get() as usize
                >= SNAPLOG_SLOTS
        }
    };
    if tail_full {
        let nb = meta.alloc_meta(&SNAPLOG_KIND)?;
        {
            let l = SnapLogDisk::mut_from_bytes(meta.write(nb, &SNAPLOG_KIND)?.as_mut_slice())
                .map_err(|_| damaged("log layout"))?;
            l.vdi = U64::new(id.0 as u64);
        }
        if let Some(&t) = v.log.last() {
            let l = SnapLogDisk::mut_from_bytes(meta.write(t, &SNAPLOG_KIND)?.as_mut_slice())
                .map_err(|_| damaged("log layout"))?;
            l.next = U64::new(nb.0);
        }
        v.log.push(nb);
    }
    let tail = *v.log.last().ok_or_else(|| damaged("empty log"))?;
    let slot = {
        let l = SnapLogDisk::mut_from_bytes(meta.write(tail, &SNAPLOG_KIND)?.as_mut_slice())
            .map_err(|_| damaged("log layout"))?;
        let slot = l.count.get() as usize;
        l.entries[slot] = SnapEntryDisk {
            id: U64::new(sid.0),
            root: U64::new(old_root.0),
            time_ns: U64::new(time_ns),
            size: U64::new(size),
            flags: U64::new(if automatic { SNAP_AUTOMATIC } else { 0 }),
        };
        l.count = U32::new(slot as u32 + 1);
        slot
    };
    v.live.root.store(new_root.0, Ordering::Release);
    write_record(meta, id, v)?;
    st.snaps.insert(
        sid,
        SnapEntry {
            vdi: id,
            root: old_root,
            time_ns,
            size,
            deleted: false,
            automatic,
            protected: false,
            name: None,
            log_block: tail,
            slot,
            open: Arc::new(AtomicUsize::new(0)),
        },
    );
    Ok(())
}

/// Frees snapshot log block `block` of VDI `vdi` once it is full and every snapshot in it is
/// deleted and no VDI was cloned from one of them: unlinked from the log, freed, its snapshots
/// forgotten. Without this a 10 ms schedule with retention grew the log (and the registry in
/// memory) by 100 entries a second forever; with it the log holds the live snapshots, at most
/// one block of deleted ones per partly deleted block, and deleted snapshots with clones (which
/// `vdi tree` and `info` still show as parents).
fn drop_dead_log_block(st: &mut State, meta: &mut Meta, vdi: VdiId, block: BlockAddr) -> Result<()> {
    let (ids, next) = {
        let l = SnapLogDisk::ref_from_bytes(meta.read(block, &SNAPLOG_KIND)?.as_slice())
            .map_err(|_| damaged("log layout"))?;
        let n = l.count.get() as usize;
        if n < SNAPLOG_SLOTS || l.entries[..n].iter().any(|e| e.flags.get() & SNAP_DELETED == 0) {
            return Ok(());
        }
        (l.entries[..n].iter().map(|e| SnapshotId(e.id.get())).collect::<Vec<_>>(), BlockAddr(l.next.get()))
    };
    if st.vdis.values().any(|v| v.parent.is_some_and(|p| ids.contains(&p))) {
        return Ok(());
    }
    let v = st.vdis.get_mut(&vdi).ok_or_else(|| VdiError::UnknownVdi(vdi.to_string()))?;
    let Some(at) = v.log.iter().position(|b| *b == block) else {
        return Err(damaged(format!("snapshot log block {block} is not in the log of VDI {vdi}")));
    };
    if at + 1 == v.log.len() {
        // The tail: the next snapshot is appended to a new block, which this one links to.
        return Ok(());
    }
    if at > 0 {
        let prev = v.log[at - 1];
        let l = SnapLogDisk::mut_from_bytes(meta.write(prev, &SNAPLOG_KIND)?.as_mut_slice())
            .map_err(|_| damaged("log layout"))?;
        l.next = U64::new(next.0);
    }
    v.log.remove(at);
    // The record names the log's head (and tail).
    write_record(meta, vdi, v)?;
    let left = meta.decref(block)?;
    if left != 0 {
        return Err(damaged(format!("snapshot log block {block} still has {left} references after its last snapshot")));
    }
    for id in ids {
        st.snaps.remove(&id);
    }
    Ok(())
}

fn mark_snap_deleted(meta: &mut Meta, log_block: BlockAddr, slot: usize) -> Result<()> {
    let l = SnapLogDisk::mut_from_bytes(meta.write(log_block, &SNAPLOG_KIND)?.as_mut_slice())
        .map_err(|_| damaged("log layout"))?;
    let f = l.entries[slot].flags.get();
    l.entries[slot].flags = U64::new(f | SNAP_DELETED);
    Ok(())
}

/// Reads the whole registry from the store.
pub(crate) fn load_state<M: MetaRead + ?Sized>(meta: &mut M) -> Result<State> {
    let mut st = State { next_snapshot: meta.user(USER_NEXT_SNAPSHOT).max(1), ..State::default() };
    let mut next = BlockAddr(meta.user(USER_REGISTRY));
    let mut expected_first = 0u64;
    while !next.is_none() {
        if st.registry_blocks.len() > (1 << 23) {
            return Err(damaged("the registry chain loops"));
        }
        let (records, nb, first) = {
            let r = RegistryDisk::ref_from_bytes(meta.read(next, &REGISTRY_KIND)?.as_slice())
                .map_err(|_| damaged("registry layout"))?;
            (r.records.map(|x| x.get()), r.next.get(), r.first_id.get())
        };
        if first != expected_first {
            return Err(damaged(format!("registry block {next} covers ids from {first}, expected {expected_first}")));
        }
        st.registry_blocks.push(next);
        for (i, rec) in records.iter().enumerate() {
            if *rec != 0 {
                let id = VdiId((first + i as u64) as u32);
                if let Err(e) = load_vdi(&mut st, meta, id, BlockAddr(*rec)) {
                    // One damaged VDI must not take the others down with it.
                    tracing::error!("VDI {id} is damaged and left out: {e}");
                    st.snaps.retain(|_, s| s.vdi != id);
                    st.vdis.remove(&id);
                    st.damaged.insert(id, e.to_string());
                }
            }
        }
        expected_first += REGISTRY_SLOTS as u64;
        next = BlockAddr(nb);
    }
    // A counter behind an id in use (which `check` reports) must not hand that id out again.
    if let Some(highest) = st.snaps.iter().map(|(sid, _)| sid.0).max() {
        st.next_snapshot = st.next_snapshot.max(highest + 1);
    }
    Ok(st)
}

fn load_vdi<M: MetaRead + ?Sized>(st: &mut State, meta: &mut M, id: VdiId, record: BlockAddr) -> Result<()> {
    let (size, root, pending, created_ns, parent, log_head, name, names_head) = {
        let r = RecordDisk::ref_from_bytes(meta.read(record, &RECORD_KIND)?.as_slice())
            .map_err(|_| damaged("record layout"))?;
        if r.id.get() != id.0 as u64 {
            return Err(damaged(format!("record block {record} is for VDI {}, registered as {id}", r.id.get())));
        }
        let len = (r.name_len.get() as usize).min(NAME_MAX);
        let name = String::from_utf8_lossy(&r.name[..len]).into_owned();
        (
            r.size.get(),
            r.root.get(),
            r.pending_root.get(),
            r.created_ns.get(),
            r.parent_snapshot.get(),
            r.log_head.get(),
            name,
            r.snap_names.get(),
        )
    };
    if root == 0 {
        return Err(damaged(format!("VDI {id} has no root")));
    }
    let mut log = Vec::new();
    let mut next = BlockAddr(log_head);
    while !next.is_none() {
        if log.len() > (1 << 24) {
            return Err(damaged(format!("snapshot log of VDI {id} loops")));
        }
        let l = SnapLogDisk::ref_from_bytes(meta.read(next, &SNAPLOG_KIND)?.as_slice())
            .map_err(|_| damaged("log layout"))?;
        if l.vdi.get() != id.0 as u64 {
            return Err(damaged(format!("snapshot log block {next} belongs to VDI {}, not {id}", l.vdi.get())));
        }
        let count = (l.count.get() as usize).min(SNAPLOG_SLOTS);
        for (slot, e) in l.entries[..count].iter().enumerate() {
            st.snaps.insert(
                SnapshotId(e.id.get()),
                SnapEntry {
                    vdi: id,
                    root: BlockAddr(e.root.get()),
                    time_ns: e.time_ns.get(),
                    size: e.size.get(),
                    deleted: e.flags.get() & SNAP_DELETED != 0,
                    automatic: e.flags.get() & SNAP_AUTOMATIC != 0,
                    protected: e.flags.get() & SNAP_PROTECTED != 0,
                    name: None,
                    log_block: next,
                    slot,
                    open: Arc::new(AtomicUsize::new(0)),
                },
            );
        }
        log.push(next);
        next = BlockAddr(l.next.get());
    }
    let crate::snap_names::NameTable { blocks: name_blocks, names } =
        crate::snap_names::load(meta, BlockAddr(names_head), id)?;
    for (sid, n) in names {
        match st.snaps.get_mut(&sid) {
            Some(s) if s.vdi == id && !s.deleted => s.name = Some(n),
            _ => return Err(damaged(format!("VDI {id} names snapshot {sid}, which is not one of its live snapshots"))),
        }
    }
    st.vdis.insert(
        id,
        VdiEntry {
            record,
            name,
            created_ns,
            parent: if parent == 0 { None } else { Some(SnapshotId(parent)) },
            log,
            name_blocks,
            pending_root: BlockAddr(pending),
            live: new_live(id, BlockAddr(root), size),
        },
    );
    Ok(())
}
