//! The metadata state of an open store: the block cache, reference counts and the allocator.
//!
//! Everything here runs under the store's metadata lock. Reads go through
//! [`crate::BlockStore::lock`]; changes only through a [`crate::Transaction`], which records the
//! state of every block it touches first so that it can roll back exactly its own changes.
//! Changed blocks stay dirty in memory until a commit journals them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::backend::Backend;
use crate::format::{
    GROUP_BLOCKS, META_HEADER_LEN, REFCOUNT_MAGIC, REFCOUNTS_PER_BLOCK, USER_ROOTS, seal_meta, verify_meta,
};
use crate::superblock::Superblock;
use crate::{BLOCK_SIZE, Block, BlockAddr, Result, StoreError};

/// Maps an I/O error from growing or reserving space to [`StoreError::NoSpace`] where it is one.
fn no_space(what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => {
            StoreError::NoSpace { detail: format!("{what}: the medium is full (file system, device or pool): {e}") }
        }
        _ => StoreError::io(what, e),
    }
}

/// How one kind of metadata block is checked when read and sealed when committed.
#[derive(Debug)]
pub struct MetaKind {
    /// Human name, used in error messages ("radix node").
    pub name: &'static str,
    /// Fills in checksums and headers before the block is written.
    pub seal: fn(&mut Block, BlockAddr),
    /// Checks a block read from disk; the error says what is wrong.
    pub verify: fn(&Block, BlockAddr) -> Result<(), String>,
}

/// The store's reference-count blocks.
pub static REFCOUNT_KIND: MetaKind = MetaKind {
    name: "reference-count",
    seal: |b, a| seal_meta(b, REFCOUNT_MAGIC, a),
    verify: |b, a| verify_meta(b, REFCOUNT_MAGIC, a),
};

struct Entry {
    /// Shared with a commit's images while it writes them (see [`Meta::begin_commit`]); a
    /// change meanwhile copies it first.
    data: Arc<Block>,
    kind: &'static MetaKind,
    dirty: bool,
    referenced: bool,
    version: u64,
}

/// What a block was when a transaction first touched it.
enum Saved {
    /// Not cached: the medium holds its state (or it was free).
    OnMedium,
    /// Cached and clean: put back as it was, so a rolled-back attempt does not empty the cache.
    Clean { data: Arc<Block>, kind: &'static MetaKind },
    /// Cached with uncommitted changes of earlier transactions.
    Dirty { data: Arc<Block>, kind: &'static MetaKind, version: u64 },
}

/// The undo log of the open transaction: enough to restore exactly the state before it.
pub(crate) struct Undo {
    blocks: HashMap<u64, Saved>,
    sb: Superblock,
    freed: Vec<u64>,
    claimed: Vec<u64>,
    reserved: Vec<u64>,
    end_block: u64,
    dirty_count: usize,
    dirty_listed: usize,
    in_commit_unchanged: usize,
    /// What the transaction did with the derived state ([`Meta::take_derived`]).
    derived: DerivedUse,
}

/// What an open transaction did with the derived state, which decides what its end does to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DerivedUse {
    /// Not taken or put: derived from blocks as they were before the transaction, which a
    /// rollback puts back, so it stays whatever happens.
    Untouched,
    /// Taken while kept, and told to record its changes ([`DerivedState::begin`]): a rollback
    /// undoes them ([`DerivedState::undo`]), a finish keeps them ([`DerivedState::keep`]).
    Recording,
    /// Put without having been kept at the transaction's first take: built from blocks the
    /// transaction may have changed, so a rollback drops it.
    Built,
}

/// State the layer above derives from its own metadata blocks and keeps in the store between
/// calls ([`Meta::take_derived`]): an index it would otherwise rebuild on every call (radix's
/// chain index reads a whole table). From the moment a transaction takes it, it records how
/// to undo each change it makes, so that a rollback — a cache miss retried, an error — puts
/// it back as the blocks are put back instead of dropping it.
pub trait DerivedState: std::any::Any + Send {
    /// A transaction took the state: from now on, record how to undo each change.
    fn begin(&mut self);
    /// The transaction's changes stay: forget the record. False if the state must not outlive
    /// the transaction (a change to it failed half-way); it is then dropped and rebuilt.
    fn keep(&mut self) -> bool;
    /// The transaction was rolled back: undo the recorded changes, leaving the state as it was
    /// at [`DerivedState::begin`]. False if it cannot (it was not recording, or recorded too
    /// little); it is then dropped and rebuilt from the blocks.
    fn undo(&mut self) -> bool;
}

/// The state of an open [`crate::FrozenView`]: the metadata as it was when the view was taken,
/// kept as the blocks changed since (their old contents) and the blocks freed since (not handed
/// out again while the view is open, so their old contents stay on the medium). Only blocks in
/// use at the view's instant are kept or held: blocks allocated later are not part of it.
pub(crate) struct Frozen {
    /// Which view this is.
    pub(crate) id: u64,
    /// The superblock when the view was taken.
    pub(crate) sb: Superblock,
    /// Contents, as of the view, of blocks changed or freed since.
    pub(crate) saved: HashMap<u64, (Arc<Block>, &'static MetaKind)>,
    /// Blocks in use in the view and freed since, whose freeing is not durable yet.
    pub(crate) freed_since: HashSet<u64>,
    /// Blocks in use in the view whose freeing became durable: not reusable until it closes.
    pub(crate) held_free: HashSet<u64>,
    /// Most blocks `saved` may hold.
    pub(crate) kept_limit: usize,
    /// The view outgrew its limits (or its held blocks were needed) and was given up.
    pub(crate) overrun: bool,
}

/// Most changed blocks a frozen view keeps by default (128 MiB) before it is given up.
pub(crate) const FROZEN_KEPT_BLOCKS: usize = 32 * 1024;

/// Most freed blocks a frozen view holds from reuse (1 GiB of space) before it is given up.
const FROZEN_HELD_BLOCKS: usize = 256 * 1024;

/// Groups looked at for a mostly free one before the store grows to hold metadata.
const META_GROUP_SEARCH: u64 = 16;

/// Free blocks an earlier metadata group needs to be chosen again: half of it, so live
/// metadata stays packed in few groups (a group with a few holes would scatter it).
const META_GROUP_REUSE: u64 = REFCOUNTS_PER_BLOCK / 2;

/// Space figures of a store, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceStats {
    /// Blocks the allocation groups can hold.
    pub capacity: u64,
    /// Blocks with a non-zero reference count.
    pub allocated: u64,
    /// Blocks freed but not reusable yet: until the next commit, or held for an online check.
    pub pending_free: u64,
    /// Size of the store in blocks, fixed areas included.
    pub store_blocks: u64,
    /// Largest size of the store in blocks (0: unlimited).
    pub max_blocks: u64,
}

/// One block of a commit as taken under the metadata lock: its contents shared with the
/// cache (nothing copied yet), not sealed.
pub(crate) struct TakenImage {
    addr: BlockAddr,
    data: Arc<Block>,
    kind: &'static MetaKind,
    version: u64,
}

/// A commit's blocks as [`Meta::begin_commit`] took them, split as [`CommitImages`] will be.
pub(crate) struct TakenImages {
    pub(crate) new: Vec<TakenImage>,
    pub(crate) journaled: Vec<TakenImage>,
}

impl TakenImages {
    /// Copies and seals every image — outside the metadata lock, so the writers it would hold
    /// up meanwhile go on (a commit of thousands of blocks held them for up to 20 ms).
    pub(crate) fn seal(self) -> CommitImages {
        let seal = |v: Vec<TakenImage>| -> Vec<(BlockAddr, Box<Block>, u64)> {
            v.into_iter()
                .map(|t| {
                    let mut img = Box::new(*t.data);
                    (t.kind.seal)(&mut img, t.addr);
                    (t.addr, img, t.version)
                })
                .collect()
        };
        CommitImages { new: seal(self.new), journaled: seal(self.journaled) }
    }
}

/// A commit's sealed images, each with the version it was at.
pub(crate) struct CommitImages {
    /// Blocks free in the last committed state: written home before the record.
    pub(crate) new: Vec<(BlockAddr, Box<Block>, u64)>,
    /// Blocks the last committed state may use: written into the record, then home.
    pub(crate) journaled: Vec<(BlockAddr, Box<Block>, u64)>,
}

/// The metadata of an open store, reached through [`crate::BlockStore::lock`].
pub struct Meta {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) sb: Superblock,
    pub(crate) committed: Superblock,
    cache: HashMap<u64, Entry>,
    clock: VecDeque<u64>,
    cache_limit: usize,
    dirty_count: usize,
    /// Every cached block that is dirty, by address, so a commit finds them without walking
    /// the whole cache under the lock (65,536 blocks by default). Pushed when a block becomes
    /// dirty, cut back by a rollback, trimmed to the blocks still dirty when a commit marks
    /// blocks clean; may also hold blocks freed since (no longer cached).
    dirty_list: Vec<u64>,
    next_version: u64,
    pub(crate) pending_free: HashSet<u64>,
    pub(crate) committing_free: HashSet<u64>,
    /// Free blocks handed out for data that is being written and not mapped yet: kept from the
    /// allocator, but their counts stay 0 until the transaction that maps them (so a crash in
    /// between leaks nothing, and a concurrent check sees nothing amiss).
    reserved: HashSet<u64>,
    /// Blocks (and their versions) whose images the running commit is writing: they stay dirty
    /// until it marks them clean, but the next record needs them only if changed again.
    in_commit: HashMap<u64, u64>,
    /// How many of `in_commit` are still at the committed version (not changed since).
    in_commit_unchanged: usize,
    pub(crate) overlay: HashMap<u64, Box<Block>>,
    pub(crate) read_only: bool,
    pub(crate) poisoned: bool,
    end_block: Arc<AtomicU64>,
    pub(crate) undo: Option<Undo>,
    /// While set, a block that is not cached is not read: the call fails with
    /// [`StoreError::NotCached`], so the caller can read it without holding the lock.
    pub(crate) cached_only: bool,
    /// Counts commits whose home writes are done: a block read from the medium without the
    /// lock may be cached only if no home write happened meanwhile. A commit moves it on before
    /// it releases its frees, so a walk that missed a block at one epoch and finds it changed
    /// later may have been looking at a block freed and reused since.
    pub(crate) home_epoch: u64,
    /// The open frozen views.
    pub(crate) frozen: Vec<Frozen>,
    /// The allocation group new metadata blocks go to while it has room (placement only, kept
    /// in memory): metadata packed in its own groups keeps the count changes of a node copy
    /// in few count blocks.
    meta_group: Option<u64>,
    /// Every group chosen for metadata since the store was opened, revisited round-robin (from
    /// `meta_revisit`) when the current one fills, so freed metadata blocks are reused before
    /// the store grows.
    meta_groups: Vec<u64>,
    meta_revisit: usize,
    /// Metadata blocks allocated since the last commit began. Each was free in the last
    /// committed state, so nothing durable refers to it and no record recovery may replay
    /// holds an image of it: the next commit writes it home before its record, not into it
    /// (docs/format.md §5). May also hold blocks a rolled-back transaction allocated, which
    /// are free again — harmless, as they are not dirty.
    fresh: HashSet<u64>,
    /// The user slots the running commit writes, from its start until it is durable.
    pub(crate) committing_user: Option<[u64; USER_ROOTS]>,
    /// State the layer above derives from its metadata blocks and keeps between calls (see
    /// [`Meta::take_derived`]). A rollback of a transaction that took it undoes its changes
    /// ([`DerivedState::undo`]); one that built it drops it, to be rebuilt from the blocks.
    derived: Option<Box<dyn DerivedState>>,
}

impl Meta {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        sb: Superblock,
        cache_limit: usize,
        read_only: bool,
        end_block: Arc<AtomicU64>,
    ) -> Meta {
        Meta {
            end_block,
            backend,
            committed: sb.clone(),
            sb,
            cache: HashMap::default(),
            clock: VecDeque::new(),
            cache_limit: cache_limit.max(64),
            dirty_count: 0,
            dirty_list: Vec::new(),
            next_version: 1,
            pending_free: HashSet::default(),
            committing_free: HashSet::default(),
            reserved: HashSet::default(),
            in_commit: HashMap::default(),
            in_commit_unchanged: 0,
            overlay: HashMap::default(),
            fresh: HashSet::default(),
            committing_user: None,
            read_only,
            poisoned: false,
            undo: None,
            cached_only: false,
            home_epoch: 0,
            frozen: Vec::new(),
            derived: None,
            meta_group: None,
            meta_groups: Vec::new(),
            meta_revisit: 0,
        }
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned { Err(StoreError::Poisoned) } else { Ok(()) }
    }

    fn check_writable(&self) -> Result<()> {
        self.check_usable()?;
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        if self.undo.is_none() {
            return Err(StoreError::NoTransaction);
        }
        Ok(())
    }

    /// Starts recording an undo log (a transaction begins).
    pub(crate) fn begin_undo(&mut self) {
        assert!(self.undo.is_none(), "transactions do not nest");
        self.undo = Some(Undo {
            blocks: HashMap::default(),
            sb: self.sb.clone(),
            freed: Vec::new(),
            claimed: Vec::new(),
            reserved: Vec::new(),
            end_block: self.end_block.load(Ordering::Acquire),
            dirty_count: self.dirty_count,
            dirty_listed: self.dirty_list.len(),
            in_commit_unchanged: self.in_commit_unchanged,
            derived: DerivedUse::Untouched,
        });
    }

    /// Keeps the open transaction's changes (they become durable at the next commit).
    pub(crate) fn end_undo(&mut self) {
        let Some(undo) = self.undo.take() else { return };
        if undo.derived != DerivedUse::Untouched && self.derived.as_mut().is_some_and(|d| !d.keep()) {
            self.derived = None;
        }
    }

    /// Notes that `addr` changes (or is freed): if the running commit holds it at the version
    /// now cached, the next record will need it after all.
    fn note_change(&mut self, addr: u64) {
        if self.in_commit_unchanged == 0 {
            return;
        }
        if let Some(&v) = self.in_commit.get(&addr)
            && self.cache.get(&addr).is_some_and(|e| e.dirty && e.version == v)
        {
            self.in_commit_unchanged -= 1;
        }
    }

    /// Metadata blocks the next journal record would hold now.
    pub fn next_record_blocks(&self) -> usize {
        self.dirty_count - self.in_commit_unchanged
    }

    /// Keeps the contents of `addr` for every open frozen view it belongs to, before it
    /// changes or is freed. Only cached blocks can change, and a block a view has not kept is
    /// unchanged since that view's instant.
    fn preserve_for_view(&mut self, addr: u64) {
        if self.frozen.is_empty() {
            return;
        }
        let Meta { frozen, cache, .. } = self;
        let Some(entry) = cache.get(&addr) else { return };
        for f in frozen.iter_mut() {
            if f.overrun || f.saved.contains_key(&addr) || !in_use_in_view(f, cache, addr) {
                continue;
            }
            if f.saved.len() >= f.kept_limit {
                give_up_view(f);
                continue;
            }
            f.saved.insert(addr, (entry.data.clone(), entry.kind));
        }
    }

    /// Called when a commit's frees are durable: the blocks become reusable, unless a frozen
    /// view still needs their old contents.
    pub(crate) fn release_committed_frees(&mut self) {
        let freed = std::mem::take(&mut self.committing_free);
        for f in self.frozen.iter_mut().filter(|f| !f.overrun) {
            for a in &freed {
                if f.freed_since.remove(a) {
                    f.held_free.insert(*a);
                }
            }
            if f.held_free.len() > FROZEN_HELD_BLOCKS {
                give_up_view(f);
            }
        }
    }

    /// Adds a group; when the store cannot grow and open frozen views hold freed blocks, gives
    /// those views up instead, so a check never makes a guest's write fail for space.
    fn grow(&mut self) -> Result<()> {
        match self.add_group() {
            Err(StoreError::NoSpace { .. }) if self.held_blocks() > 0 => {
                for f in self.frozen.iter_mut().filter(|f| !f.held_free.is_empty()) {
                    give_up_view(f);
                }
                Ok(())
            }
            other => other,
        }
    }

    /// True if a frozen view keeps `addr` from reuse.
    fn held_for_view(&self, addr: u64) -> bool {
        self.frozen.iter().any(|f| f.held_free.contains(&addr))
    }

    /// Blocks frozen views keep from reuse (a block two views hold counts twice).
    fn held_blocks(&self) -> usize {
        self.frozen.iter().map(|f| f.held_free.len()).sum()
    }

    /// The cached copy of `addr`, if any, with its kind (for frozen views).
    pub(crate) fn cached_entry(&self, addr: u64) -> Option<(&Block, &'static MetaKind)> {
        self.cache.get(&addr).map(|e| (&*e.data, e.kind))
    }

    /// Records the state of `addr` before the open transaction first changes it.
    fn save_before(&mut self, addr: u64) {
        let Some(undo) = self.undo.as_mut() else { return };
        if undo.blocks.contains_key(&addr) {
            return;
        }
        let saved = match self.cache.get(&addr) {
            Some(e) if e.dirty => Saved::Dirty { data: e.data.clone(), kind: e.kind, version: e.version },
            Some(e) => Saved::Clean { data: e.data.clone(), kind: e.kind },
            None => Saved::OnMedium,
        };
        undo.blocks.insert(addr, saved);
    }

    /// Puts back everything the open transaction changed, and nothing else: blocks, the
    /// superblock, blocks it freed and the store's size as seen by data I/O.
    pub(crate) fn rollback(&mut self) {
        let Some(undo) = self.undo.take() else { return };
        for (addr, saved) in undo.blocks {
            match saved {
                Saved::OnMedium => {
                    self.cache.remove(&addr);
                }
                Saved::Clean { data, kind } => {
                    if !self.cache.contains_key(&addr) {
                        self.clock.push_back(addr);
                    }
                    self.cache.insert(addr, Entry { data, kind, dirty: false, referenced: true, version: 0 });
                }
                Saved::Dirty { data, kind, version } => {
                    if !self.cache.contains_key(&addr) {
                        self.clock.push_back(addr);
                    }
                    self.cache.insert(addr, Entry { data, kind, dirty: true, referenced: true, version });
                }
            }
        }
        for a in undo.freed {
            self.pending_free.remove(&a);
        }
        for a in undo.claimed {
            self.reserved.insert(a);
        }
        for a in undo.reserved {
            self.reserved.remove(&a);
        }
        self.sb = undo.sb;
        // Derived state the transaction took has its changes undone with the blocks'; state
        // it built from blocks it may have changed is dropped and rebuilt from the blocks
        // when next asked for. State it never took was derived from blocks as they were
        // before it, which are what the rollback just put back, so it stays. (Rebuilding
        // the chain index reads the whole table under the lock.)
        let undone = match undo.derived {
            DerivedUse::Untouched => true,
            DerivedUse::Recording => self.derived.as_mut().is_some_and(|d| d.undo()),
            DerivedUse::Built => false,
        };
        if !undone {
            self.derived = None;
        }
        self.end_block.store(undo.end_block, Ordering::Release);
        // A metadata group the transaction added is gone with it.
        let groups = self.sb.groups;
        self.meta_group = self.meta_group.filter(|&g| g < groups);
        self.meta_groups.retain(|&g| g < groups);
        // No commit can start or end while a transaction holds the lock, so the counters
        // are exactly what they were when it began.
        self.dirty_count = undo.dirty_count;
        // What the transaction listed it made dirty, and it is clean (or gone) again.
        self.dirty_list.truncate(undo.dirty_listed);
        self.in_commit_unchanged = undo.in_commit_unchanged;
        debug_assert_eq!(self.dirty_count, self.cache.values().filter(|e| e.dirty).count());
    }

    /// Metadata blocks the open transaction has changed so far.
    pub fn transaction_blocks(&self) -> usize {
        self.undo.as_ref().map_or(0, |u| u.blocks.len())
    }

    /// True if the store was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Makes sure `addr` is cached, reading and verifying it if needed.
    fn ensure_cached(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&mut Entry> {
        self.check_usable()?;
        if !self.cache.contains_key(&addr.0) {
            if addr.0 < self.sb.groups_start || addr.0 >= self.sb.end_block() {
                return Err(StoreError::Corrupt {
                    kind: kind.name,
                    addr,
                    reason: format!("address outside the store's {} blocks", self.sb.end_block()),
                });
            }
            if self.cached_only && !self.overlay.contains_key(&addr.0) {
                return Err(StoreError::NotCached { addr, meta_kind: kind, epoch: self.home_epoch });
            }
            let mut data = Arc::new([0u8; BLOCK_SIZE]);
            // Not shared yet: no copy.
            let buf = Arc::make_mut(&mut data);
            if let Some(img) = self.overlay.get(&addr.0) {
                buf.copy_from_slice(img.as_slice());
            } else {
                self.backend
                    .read_at(addr.byte_offset(), buf.as_mut_slice())
                    .map_err(|e| StoreError::io(format!("reading {} block {addr}", kind.name), e))?;
            }
            (kind.verify)(&data, addr).map_err(|reason| StoreError::Corrupt { kind: kind.name, addr, reason })?;
            self.evict_if_full();
            self.cache.insert(addr.0, Entry { data, kind, dirty: false, referenced: false, version: 0 });
            self.clock.push_back(addr.0);
        }
        let entry = self.cache.get_mut(&addr.0).ok_or_else(|| StoreError::Damaged("cache lost a block".into()))?;
        if !std::ptr::eq(entry.kind, kind) {
            return Err(StoreError::Corrupt {
                kind: kind.name,
                addr,
                reason: format!("block is in use as a {} block", entry.kind.name),
            });
        }
        entry.referenced = true;
        Ok(entry)
    }

    /// Drops clean, not recently used blocks while the cache is over its limit (CLOCK).
    fn evict_if_full(&mut self) {
        let mut budget = self.clock.len() * 2;
        while self.cache.len() >= self.cache_limit && budget > 0 {
            budget -= 1;
            let Some(a) = self.clock.pop_front() else { break };
            match self.cache.get_mut(&a) {
                None => {}
                Some(e) if e.dirty || e.referenced => {
                    e.referenced = false;
                    self.clock.push_back(a);
                }
                Some(_) => {
                    self.cache.remove(&a);
                }
            }
        }
    }

    /// True if block `addr` is in memory.
    pub fn is_cached(&self, addr: BlockAddr) -> bool {
        self.cache.contains_key(&addr.0)
    }

    /// Caches a block read from the medium without the lock, unless it was cached meanwhile or
    /// a commit wrote blocks home since `epoch` (the read may then be stale). True if cached.
    pub(crate) fn insert_loaded(
        &mut self,
        addr: BlockAddr,
        kind: &'static MetaKind,
        data: Arc<Block>,
        epoch: u64,
    ) -> bool {
        if self.home_epoch != epoch
            || self.cache.contains_key(&addr.0)
            || self.is_pending_free(addr)
            || self.overlay.contains_key(&addr.0)
        {
            return false;
        }
        self.evict_if_full();
        self.cache.insert(addr.0, Entry { data, kind, dirty: false, referenced: true, version: 0 });
        self.clock.push_back(addr.0);
        true
    }

    /// Reads metadata block `addr` of the given kind (verified when first loaded).
    pub fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block> {
        Ok(&self.ensure_cached(addr, kind)?.data)
    }

    /// Opens metadata block `addr` for change; it will be journaled at the next commit.
    pub fn write(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&mut Block> {
        self.check_writable()?;
        // Loaded (and checked) first, so a failure changes no bookkeeping.
        self.ensure_cached(addr, kind)?;
        self.preserve_for_view(addr.0);
        self.save_before(addr.0);
        self.note_change(addr.0);
        let version = self.next_version;
        self.next_version += 1;
        let entry = self.cache.get_mut(&addr.0).ok_or_else(|| StoreError::Damaged("cache lost a block".into()))?;
        if !entry.dirty {
            self.dirty_count += 1;
            self.dirty_list.push(addr.0);
        }
        entry.dirty = true;
        entry.version = version;
        Ok(Arc::make_mut(&mut entry.data))
    }

    /// Allocates a new metadata block of `kind` with reference count 1, all zeros and dirty.
    /// Its space on the medium is reserved, so writing it home after a commit cannot fail for
    /// lack of space.
    pub fn alloc_meta(&mut self, kind: &'static MetaKind) -> Result<BlockAddr> {
        self.check_writable()?;
        let addr = self.place_meta(None)?;
        self.init_meta(addr, kind)
    }

    /// Like [`Meta::alloc_meta`], but in the allocation group of `near` when it has a free
    /// block: a node copy placed beside its original stays with the other metadata. Placement
    /// only; nothing durable depends on it.
    pub fn alloc_meta_near(&mut self, kind: &'static MetaKind, near: BlockAddr) -> Result<BlockAddr> {
        self.check_writable()?;
        let addr = self.place_meta(Some(near))?;
        self.init_meta(addr, kind)
    }

    /// Finds a block for new metadata and gives it count 1: beside `near`, else in the current
    /// metadata group, else in an earlier metadata group half free again, else in a mostly free
    /// group nearby, else in a group added for metadata, else wherever the allocator finds one.
    ///
    /// Metadata kept apart from data is what makes copying an upper node cheap: its 512
    /// children are nodes, and packed together their counts sit in one or two count blocks
    /// instead of one per group of the VDI (docs/design.md, "What a copy-on-write costs after
    /// a snapshot").
    fn place_meta(&mut self, near: Option<BlockAddr>) -> Result<BlockAddr> {
        if let Some(near) = near
            && let Some((addr, _)) = self.take_near(1, true, near)?
        {
            return Ok(addr);
        }
        if let Some(group) = self.meta_group.filter(|&g| g < self.sb.groups)
            && let Some((first, _)) = self.free_in_group(group, 0, 1)?
        {
            return Ok(self.take_in_group(group, first, 1, true)?.0);
        }
        let group = match self.earlier_meta_group()? {
            Some(group) => group,
            None => match self.mostly_free_group()? {
                Some(group) => group,
                None => {
                    let group = self.sb.groups;
                    let cursor = self.sb.alloc_cursor;
                    match self.add_group() {
                        // The new group is for metadata: data keeps allocating where it was.
                        Ok(()) => self.sb.alloc_cursor = cursor,
                        Err(StoreError::NoSpace { .. }) => return Ok(self.alloc_run(1)?.0),
                        Err(e) => return Err(e),
                    }
                    group
                }
            },
        };
        if !self.meta_groups.contains(&group) {
            self.meta_groups.push(group);
        }
        self.meta_group = Some(group);
        match self.free_in_group(group, 0, 1)? {
            Some((first, _)) => Ok(self.take_in_group(group, first, 1, true)?.0),
            // Its free blocks are all waiting for a commit or held by a view.
            None => Ok(self.alloc_run(1)?.0),
        }
    }

    /// An earlier metadata group with room again (at least [`META_GROUP_REUSE`] blocks free),
    /// looking at up to [`META_GROUP_SEARCH`] of them round-robin.
    fn earlier_meta_group(&mut self) -> Result<Option<u64>> {
        let known = self.meta_groups.len();
        for _ in 0..known.min(META_GROUP_SEARCH as usize) {
            let group = self.meta_groups[self.meta_revisit % known];
            self.meta_revisit = self.meta_revisit.wrapping_add(1);
            if Some(group) != self.meta_group
                && group < self.sb.groups
                && self.zero_counts(group)? >= META_GROUP_REUSE
                && self.free_in_group(group, 0, 1)?.is_some()
            {
                return Ok(Some(group));
            }
        }
        Ok(None)
    }

    /// Blocks of `group` whose reference count is 0.
    fn zero_counts(&mut self, group: u64) -> Result<u64> {
        let counts = self.read(BlockAddr(self.sb.groups_start + group * GROUP_BLOCKS), &REFCOUNT_KIND)?;
        Ok((0..REFCOUNTS_PER_BLOCK)
            .filter(|&i| {
                let at = META_HEADER_LEN + i as usize * 4;
                counts[at..at + 4] == [0; 4]
            })
            .count() as u64)
    }

    /// Reserves the medium's space for new metadata block `addr` (count 1) and caches it zeroed
    /// and dirty.
    fn init_meta(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<BlockAddr> {
        if let Err(e) = self.backend.reserve(addr.byte_offset(), BLOCK_SIZE as u64) {
            self.decref(addr)?;
            return Err(no_space("cannot reserve a metadata block")(e));
        }
        self.save_before(addr.0);
        let version = self.next_version;
        self.next_version += 1;
        self.evict_if_full();
        self.cache
            .insert(addr.0, Entry { data: Arc::new([0; BLOCK_SIZE]), kind, dirty: true, referenced: true, version });
        self.clock.push_back(addr.0);
        self.dirty_count += 1;
        self.dirty_list.push(addr.0);
        self.fresh.insert(addr.0);
        Ok(addr)
    }

    /// Allocates one data block with reference count 1. Its contents are undefined until written.
    pub fn alloc_data(&mut self) -> Result<BlockAddr> {
        Ok(self.alloc_run(1)?.0)
    }

    /// Reserves up to `max` consecutive free blocks for data about to be written, without
    /// changing any count: the blocks are kept from the allocator until [`Meta::claim`] (in the
    /// transaction that maps them) or [`Meta::unreserve`]. Nothing durable changes, so a crash
    /// before the mapping commits leaks nothing. At least one block is reserved or an error
    /// returned.
    pub fn reserve_run(&mut self, max: u64) -> Result<(BlockAddr, u64)> {
        self.check_writable()?;
        let found = self.find_run(max, false)?;
        self.note_reserved(found);
        Ok(found)
    }

    /// Like [`Meta::reserve_run`], but takes the blocks from the allocation group of `near` if
    /// it has `max` consecutive free blocks, and only otherwise from the allocator's cursor.
    ///
    /// A write needing new blocks passes a block of the group its leaf's data lives in, so a
    /// later copy of that leaf after a snapshot changes the counts in one or two count blocks
    /// instead of one per block (docs/design.md, "What a copy-on-write costs after a
    /// snapshot"). The current metadata group is never used for data. Placement only; nothing
    /// durable depends on it.
    pub fn reserve_run_near(&mut self, max: u64, near: BlockAddr) -> Result<(BlockAddr, u64)> {
        self.check_writable()?;
        let found = match self.take_near(max, false, near)? {
            Some(found) => found,
            None => self.find_run(max, false)?,
        };
        self.note_reserved(found);
        Ok(found)
    }

    /// Keeps `n` blocks from `first` from the allocator until claimed or unreserved.
    fn note_reserved(&mut self, (first, n): (BlockAddr, u64)) {
        for a in first.0..first.0 + n {
            self.reserved.insert(a);
            if let Some(u) = self.undo.as_mut() {
                u.reserved.push(a);
            }
        }
    }

    /// Gives a reserved block reference count 1 (in the open transaction).
    pub fn claim(&mut self, addr: BlockAddr) -> Result<()> {
        let (rc, at) = self.refcount_slot(addr)?;
        if !self.reserved.contains(&addr.0) {
            return Err(StoreError::Damaged(format!("claiming block {addr}, which was not reserved")));
        }
        let b = self.write(rc, &REFCOUNT_KIND)?;
        if b[at..at + 4] != [0; 4] {
            return Err(StoreError::Damaged(format!("reserved block {addr} is in use")));
        }
        b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        self.sb.allocated += 1;
        self.reserved.remove(&addr.0);
        if let Some(u) = self.undo.as_mut() {
            u.claimed.push(addr.0);
        }
        Ok(())
    }

    /// Returns reserved blocks that were not claimed to the allocator.
    pub fn unreserve(&mut self, first: BlockAddr, n: u64) {
        for a in first.0..first.0 + n {
            self.reserved.remove(&a);
        }
    }

    /// Allocates up to `max` consecutive blocks, each with reference count 1; returns the first
    /// and how many. At least one is allocated or an error returned.
    pub fn alloc_run(&mut self, max: u64) -> Result<(BlockAddr, u64)> {
        self.check_writable()?;
        self.find_run(max, true)
    }

    /// Finds up to `max` consecutive usable blocks, growing the store if needed; with `count`,
    /// gives each reference count 1.
    fn find_run(&mut self, max: u64, count: bool) -> Result<(BlockAddr, u64)> {
        let max = max.max(1);
        loop {
            let held = self.held_blocks();
            let unusable = (self.pending_free.len() + self.committing_free.len() + self.reserved.len() + held) as u64;
            if self.sb.allocated + unusable >= self.sb.groups * REFCOUNTS_PER_BLOCK {
                self.grow()?;
            }
            let first = self.sb.groups_start + 1;
            let mut start = self.sb.alloc_cursor;
            if start < first || start >= self.sb.end_block() {
                start = first;
            }
            if let Some(found) = self.scan_from(start, max, count, true)? {
                return Ok(found);
            }
            if start > first
                && let Some(found) = self.scan_from(first, max, count, true)?
            {
                return Ok(found);
            }
            // Every free block is waiting for a commit or kept for metadata: grow instead. A
            // store that cannot grow gives data the metadata group's free blocks too.
            match self.grow() {
                Ok(()) => {}
                Err(e @ StoreError::NoSpace { .. }) if !count && self.meta_group.is_some() => {
                    return self.scan_from(first, max, count, false)?.ok_or(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Looks for free blocks from `cursor` to the end of the store; data (`!count`) passes the
    /// current metadata group by while `spare_meta` is set.
    fn scan_from(&mut self, cursor: u64, max: u64, count: bool, spare_meta: bool) -> Result<Option<(BlockAddr, u64)>> {
        let mut group = (cursor - self.sb.groups_start) / GROUP_BLOCKS;
        let mut index = ((cursor - self.sb.groups_start) % GROUP_BLOCKS).max(1) - 1;
        while group < self.sb.groups {
            if spare_meta && !count && self.meta_group == Some(group) {
                // Data leaves the metadata group's free blocks to metadata.
                group += 1;
                index = 0;
                continue;
            }
            if let Some((first, n)) = self.free_in_group(group, index, max)? {
                self.sb.alloc_cursor = self.sb.groups_start + group * GROUP_BLOCKS + 1 + first + n;
                return self.take_in_group(group, first, n, count).map(Some);
            }
            group += 1;
            index = 0;
        }
        Ok(None)
    }

    /// Which allocation group a block lies in, if any, as the store stands now (placement
    /// hints compare groups); the function holds no borrow of the store.
    pub fn group_of(&self) -> impl Fn(BlockAddr) -> Option<u64> + use<> {
        let (start, end) = (self.sb.groups_start, self.sb.end_block());
        move |addr: BlockAddr| (addr.0 > start && addr.0 < end).then(|| (addr.0 - start) / GROUP_BLOCKS)
    }

    /// A group at least three quarters free among the few after the last metadata group (or
    /// after the allocator's cursor), to hold metadata before the store is grown for it: a
    /// store with room left reuses it. Looks at [`META_GROUP_SEARCH`] groups at most.
    fn mostly_free_group(&mut self) -> Result<Option<u64>> {
        let groups = self.sb.groups;
        if groups == 0 {
            return Ok(None);
        }
        let from = match self.meta_group {
            Some(g) => g + 1,
            None => self.group_of()(BlockAddr(self.sb.alloc_cursor)).map_or(0, |g| g + 1),
        };
        for k in 0..META_GROUP_SEARCH.min(groups) {
            let group = (from + k) % groups;
            if Some(group) == self.meta_group {
                continue;
            }
            if self.zero_counts(group)? * 4 >= REFCOUNTS_PER_BLOCK * 3 && self.free_in_group(group, 0, 1)?.is_some() {
                return Ok(Some(group));
            }
        }
        Ok(None)
    }

    /// `max` consecutive usable blocks in the allocation group of `near`, if it has them; with
    /// `count`, each given reference count 1. Leaves the allocator's cursor where it is.
    fn take_near(&mut self, max: u64, count: bool, near: BlockAddr) -> Result<Option<(BlockAddr, u64)>> {
        let max = max.max(1);
        let Some(group) = self.group_of()(near) else { return Ok(None) };
        if !count && self.meta_group == Some(group) {
            return Ok(None);
        }
        match self.free_in_group(group, 0, max)? {
            Some((first, n)) if n == max => self.take_in_group(group, first, n, count).map(Some),
            _ => Ok(None),
        }
    }

    /// Blocks `first..first + n` of `group` (indexes after its count block), found usable; with
    /// `count`, each given reference count 1 in the open transaction.
    fn take_in_group(&mut self, group: u64, first: u64, n: u64, count: bool) -> Result<(BlockAddr, u64)> {
        let rc_addr = BlockAddr(self.sb.groups_start + group * GROUP_BLOCKS);
        if count {
            let block = self.write(rc_addr, &REFCOUNT_KIND)?;
            for i in first..first + n {
                let at = META_HEADER_LEN + i as usize * 4;
                block[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
            }
            self.sb.allocated += n;
        }
        Ok((BlockAddr(rc_addr.0 + 1 + first), n))
    }

    /// The first run of up to `max` usable blocks of `group` at or after index `from` (indexes
    /// count the group's blocks after its count block): (first index, length).
    fn free_in_group(&mut self, group: u64, from: u64, max: u64) -> Result<Option<(u64, u64)>> {
        let rc_addr = BlockAddr(self.sb.groups_start + group * GROUP_BLOCKS);
        let base = rc_addr.0 + 1;
        let counts: Box<Block> = Box::new(*self.read(rc_addr, &REFCOUNT_KIND)?);
        let usable = |i: u64| {
            let at = META_HEADER_LEN + i as usize * 4;
            counts[at..at + 4] == [0; 4]
                && !self.pending_free.contains(&(base + i))
                && !self.committing_free.contains(&(base + i))
                && !self.reserved.contains(&(base + i))
                && !self.held_for_view(base + i)
        };
        Ok((from..REFCOUNTS_PER_BLOCK).find(|&i| usable(i)).map(|first| {
            (first, (first..REFCOUNTS_PER_BLOCK).take(max as usize).take_while(|&i| usable(i)).count() as u64)
        }))
    }

    /// Adds one allocation group at the end of the store, reserving its space first.
    fn add_group(&mut self) -> Result<()> {
        let bytes = self.grown_bytes()?;
        let rc_addr = self.sb.end_block();
        // The file grows sparsely; only the reference-count block's space is reserved here.
        // Metadata blocks reserve theirs when allocated; a data write that finds no space
        // fails cleanly and its block is freed.
        self.backend
            .extend(bytes)
            .and_then(|_| self.backend.reserve(rc_addr * BLOCK_SIZE as u64, BLOCK_SIZE as u64))
            .map_err(no_space("cannot grow the store"))?;
        self.save_before(rc_addr);
        let version = self.next_version;
        self.next_version += 1;
        self.sb.groups += 1;
        self.evict_if_full();
        self.cache.insert(
            rc_addr,
            Entry { data: Arc::new([0; BLOCK_SIZE]), kind: &REFCOUNT_KIND, dirty: true, referenced: true, version },
        );
        self.clock.push_back(rc_addr);
        self.dirty_count += 1;
        self.dirty_list.push(rc_addr);
        self.sb.alloc_cursor = rc_addr + 1;
        self.end_block.store(self.sb.end_block(), Ordering::Release);
        Ok(())
    }

    /// Where the reference count of `addr` lives: (count block, byte offset in it).
    fn refcount_slot(&self, addr: BlockAddr) -> Result<(BlockAddr, usize)> {
        refcount_slot(&self.sb, addr)
    }

    /// The reference count of `addr`.
    pub fn refcount(&mut self, addr: BlockAddr) -> Result<u32> {
        crate::view::MetaRead::refcount(self, addr)
    }

    /// Adds one reference to `addr`; returns the new count.
    pub fn incref(&mut self, addr: BlockAddr) -> Result<u32> {
        let (rc, at) = self.refcount_slot(addr)?;
        add_reference(self.write(rc, &REFCOUNT_KIND)?, at, addr)
    }

    /// Adds one reference to each of `addrs` (a block listed twice gains two), opening each
    /// reference-count block for change once rather than once per address: copying a shared
    /// radix node adds a reference to each of its up to 512 children, which usually share a few
    /// count blocks. Fails like [`Meta::incref`]; inside a transaction a failure rolls back.
    pub fn incref_all(&mut self, addrs: &[BlockAddr]) -> Result<()> {
        // A plain loop: collecting into a `Result<Vec<_>>` cost twice as much per child
        // (perf on a node copy after a snapshot).
        let mut slots = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let (count_block, at) = self.refcount_slot(addr)?;
            slots.push(CountSlot { count_block, at, addr });
        }
        slots.sort_unstable_by_key(|s| s.count_block);
        for group in slots.chunk_by(|x, y| x.count_block == y.count_block) {
            let b = self.write(group[0].count_block, &REFCOUNT_KIND)?;
            for s in group {
                add_reference(b, s.at, s.addr)?;
            }
        }
        Ok(())
    }

    /// Drops one reference to `addr`; returns the new count. At zero the block is freed: it can
    /// be reused once the commit that frees it is durable.
    pub fn decref(&mut self, addr: BlockAddr) -> Result<u32> {
        let (rc, at) = self.refcount_slot(addr)?;
        let b = self.write(rc, &REFCOUNT_KIND)?;
        let old = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let new = old.checked_sub(1).ok_or_else(|| StoreError::Damaged(format!("block {addr} freed twice")))?;
        b[at..at + 4].copy_from_slice(&new.to_le_bytes());
        if new == 0 {
            self.sb.allocated = self.sb.allocated.checked_sub(1).ok_or_else(|| {
                StoreError::Damaged(format!("freeing block {addr} but the superblock counts no block in use"))
            })?;
            self.forget_freed(addr.0);
        }
        Ok(new)
    }

    /// Marks `addr`, whose count just reached zero, freed, and drops its cached copy: a freed
    /// block's changes are never committed (format.md §5, step 1) — a record holding an image
    /// of a block reused later as a new block would overwrite it at recovery.
    fn forget_freed(&mut self, addr: u64) {
        self.note_freed(addr);
        self.preserve_for_view(addr);
        self.save_before(addr);
        self.note_change(addr);
        if let Some(e) = self.cache.remove(&addr)
            && e.dirty
        {
            self.dirty_count -= 1;
        }
    }

    /// Marks `addr` free but not reusable before the commit that frees it is durable.
    fn note_freed(&mut self, addr: u64) {
        let Meta { frozen, cache, .. } = self;
        for f in frozen.iter_mut() {
            if !f.overrun && in_use_in_view(f, cache, addr) {
                f.freed_since.insert(addr);
            }
        }
        if self.pending_free.insert(addr)
            && let Some(u) = self.undo.as_mut()
        {
            u.freed.push(addr);
        }
    }

    /// Takes the state the layer above derived from its own metadata blocks and left here
    /// with [`Meta::put_derived`] (an index it would otherwise rebuild on every call), if it is
    /// still there and of type `T`; the caller rebuilds it from the blocks when this is `None`.
    /// The layer above changes the blocks the state is derived from only while it holds the
    /// state. The first take of a transaction tells the state to record its changes
    /// ([`DerivedState::begin`]): the transaction's rollback undoes them, so the state never
    /// outlives the block contents it was derived from, and its finish keeps them.
    pub fn take_derived<T: DerivedState>(&mut self) -> Option<Box<T>> {
        if let Some(u) = self.undo.as_mut() {
            match (u.derived, self.derived.as_mut()) {
                (DerivedUse::Untouched, Some(d)) => {
                    d.begin();
                    u.derived = DerivedUse::Recording;
                }
                // None kept: whatever is put next is built inside the transaction.
                (_, None) => u.derived = DerivedUse::Built,
                _ => {}
            }
        }
        let state: Box<dyn std::any::Any> = self.derived.take()?;
        state.downcast::<T>().ok()
    }

    /// Leaves derived state for the next [`Meta::take_derived`]. Inside a transaction, state
    /// not taken at the transaction's first take counts as built from the transaction's
    /// blocks: its rollback drops it.
    pub fn put_derived<T: DerivedState>(&mut self, state: Box<T>) {
        if let Some(u) = self.undo.as_mut()
            && u.derived == DerivedUse::Untouched
        {
            u.derived = DerivedUse::Built;
        }
        self.derived = Some(state);
    }

    /// Lends the derived state of type `T`, if it is there, to `f` read-only: it stays what it
    /// was whatever `f` returns (an error, a cache miss), and lending does not count as the
    /// transaction taking it, so a rollback keeps it. If `f` puts state of its own meanwhile
    /// (it found none and built it), that state stays instead.
    pub fn lend_derived<T: DerivedState, R>(&mut self, f: impl FnOnce(&mut Meta, Option<&T>) -> R) -> R {
        let state = self.derived.take();
        let out = f(self, state.as_deref().and_then(|s| (s as &dyn std::any::Any).downcast_ref::<T>()));
        if self.derived.is_none() {
            self.derived = state;
        }
        out
    }

    /// True if `addr` was freed and its freeing is not durable yet (it must not be used).
    pub fn is_pending_free(&self, addr: BlockAddr) -> bool {
        self.pending_free.contains(&addr.0) || self.committing_free.contains(&addr.0)
    }

    /// The upper layer's root or counter in slot `i` (0..16).
    pub fn user(&self, i: usize) -> u64 {
        self.sb.user[i % USER_ROOTS]
    }

    /// For a counter in slot `i`: the lowest value a crash now could leave there — as the
    /// last completed commit left it, or as a commit now running writes it, whichever is
    /// lower (a later change lowering it again is the caller's to order). An upper layer
    /// hands out values below it without committing (`vdi`'s scheduled snapshot ids). Not
    /// meaningful for a slot holding an address.
    pub fn committed_user(&self, i: usize) -> u64 {
        let committed = self.committed.user[i % USER_ROOTS];
        self.committing_user.map_or(committed, |running| committed.min(running[i % USER_ROOTS]))
    }

    /// Sets the upper layer's root or counter in slot `i` (0..16).
    pub fn set_user(&mut self, i: usize, value: u64) -> Result<()> {
        self.check_writable()?;
        self.sb.user[i % USER_ROOTS] = value;
        Ok(())
    }

    /// Metadata blocks changed since the last commit.
    pub fn dirty_blocks(&self) -> usize {
        self.dirty_count
    }

    /// Metadata blocks one commit can hold.
    pub fn journal_capacity(&self) -> usize {
        // Header, address blocks and the superblock image take a few slots.
        let slot = self.sb.journal_slot_blocks as usize;
        slot - 2 - slot.div_ceil(BLOCK_SIZE / 8)
    }

    /// True once the changes not yet committed fill half the journal: commit before adding
    /// more (the other half is the margin for transactions already under way).
    pub fn should_commit(&self) -> bool {
        self.next_record_blocks() * 2 >= self.journal_capacity()
    }

    /// True once they fill a quarter of it: time a background commit started, so that
    /// [`Meta::should_commit`] is rarely reached on a guest's write path.
    pub fn commit_soon(&self) -> bool {
        self.next_record_blocks() * 4 >= self.journal_capacity()
    }

    /// True if the store can add another allocation group (it is below its size limit and
    /// the device can hold one more). A file may still fail to grow when its filesystem fills.
    pub fn can_grow(&self) -> bool {
        self.grown_bytes().is_ok()
    }

    /// The store's size in bytes with one more allocation group, if its size limit and the
    /// device allow one.
    fn grown_bytes(&self) -> Result<u64> {
        let new_end = self.sb.end_block() + GROUP_BLOCKS;
        if self.sb.max_blocks != 0 && new_end > self.sb.max_blocks {
            return Err(StoreError::NoSpace {
                detail: format!("the store is at its size limit of {} blocks", self.sb.max_blocks),
            });
        }
        new_end.checked_mul(BLOCK_SIZE as u64).filter(|&b| b <= self.backend.capacity()).ok_or_else(|| {
            StoreError::NoSpace { detail: format!("the device holds {} bytes", self.backend.capacity()) }
        })
    }

    /// Space figures.
    pub fn space(&self) -> SpaceStats {
        SpaceStats {
            capacity: self.sb.groups * REFCOUNTS_PER_BLOCK,
            allocated: self.sb.allocated,
            pending_free: (self.pending_free.len() + self.committing_free.len() + self.held_blocks()) as u64,
            store_blocks: self.sb.end_block(),
            max_blocks: self.sb.max_blocks,
        }
    }

    /// The working superblock (as it will be committed).
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Every allocatable block with a non-zero count, in address order, with its count.
    /// Reads every reference-count block: for checkers, not for the I/O path.
    pub fn all_refcounts(&mut self) -> Result<Vec<(BlockAddr, u32)>> {
        crate::view::MetaRead::all_refcounts(self)
    }

    /// Sets the reference count of `addr` outright (for repair tools only).
    pub fn set_refcount(&mut self, addr: BlockAddr, count: u32) -> Result<()> {
        let (rc, at) = self.refcount_slot(addr)?;
        let b = self.write(rc, &REFCOUNT_KIND)?;
        let old = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        b[at..at + 4].copy_from_slice(&count.to_le_bytes());
        match (old, count) {
            (0, c) if c > 0 => self.sb.allocated += 1,
            (o, 0) if o > 0 => {
                self.sb.allocated = self.sb.allocated.saturating_sub(1);
                self.forget_freed(addr.0);
            }
            _ => {}
        }
        Ok(())
    }

    /// Takes the images of every dirty block for a commit (shared with the cache, cheap under
    /// the lock; [`TakenImages::seal`] copies them after), notes them (see
    /// [`Meta::next_record_blocks`]), and splits them: the blocks allocated since the last
    /// commit began, which it writes home before its record, and the rest, which go into the
    /// record. Blocks allocated from now on are the next commit's.
    pub(crate) fn begin_commit(&mut self) -> TakenImages {
        // The list stays as it is until the commit marks blocks clean, so a commit that never
        // gets there (an error or a panic half-way) leaves it whole for the next one.
        let Meta { dirty_list, cache, .. } = self;
        dirty_list.sort_unstable();
        dirty_list.dedup();
        let taken: Vec<TakenImage> = dirty_list
            .iter()
            .filter_map(|&a| {
                let e = cache.get(&a).filter(|e| e.dirty)?;
                Some(TakenImage { addr: BlockAddr(a), data: e.data.clone(), kind: e.kind, version: e.version })
            })
            .collect();
        // A dirty block missing from the list would be missing from the record: lost.
        assert_eq!(taken.len(), self.dirty_count, "the dirty list lost a dirty block");
        self.in_commit = taken.iter().map(|t| (t.addr.0, t.version)).collect();
        self.in_commit_unchanged = self.in_commit.len();
        let fresh = std::mem::take(&mut self.fresh);
        let (new, journaled) = taken.into_iter().partition(|t| fresh.contains(&t.addr.0));
        TakenImages { new, journaled }
    }

    /// Marks blocks clean whose version has not changed since their images were taken.
    pub(crate) fn mark_clean(&mut self, written: &[(BlockAddr, u64)]) {
        self.home_epoch += 1;
        self.in_commit.clear();
        self.in_commit_unchanged = 0;
        for (a, v) in written {
            if let Some(e) = self.cache.get_mut(&a.0)
                && e.dirty
                && e.version == *v
            {
                e.dirty = false;
                self.dirty_count -= 1;
            }
        }
        // What is still dirty (changed while the commit ran, or since) stays listed.
        let Meta { dirty_list, cache, .. } = self;
        dirty_list.retain(|a| cache.get(a).is_some_and(|e| e.dirty));
    }

    /// True if anything changed since the last commit.
    pub fn has_changes(&self) -> bool {
        self.dirty_count > 0 || !self.pending_free.is_empty() || self.sb != self.committed
    }
}

/// Adds one to the count of `addr` at byte `at` of its count block `b`; returns the new count.
fn add_reference(b: &mut Block, at: usize, addr: BlockAddr) -> Result<u32> {
    let old = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if old == 0 {
        return Err(StoreError::Damaged(format!("reference added to free block {addr}")));
    }
    let new = old.checked_add(1).ok_or_else(|| StoreError::Damaged(format!("reference count of {addr} overflows")))?;
    b[at..at + 4].copy_from_slice(&new.to_le_bytes());
    Ok(new)
}

/// Where one block's reference count lives.
struct CountSlot {
    /// The count block.
    count_block: BlockAddr,
    /// Byte offset of the count in it.
    at: usize,
    /// The block counted.
    addr: BlockAddr,
}

/// Where the reference count of `addr` lives in a store with superblock `sb`: (count block,
/// byte offset in it).
pub(crate) fn refcount_slot(sb: &Superblock, addr: BlockAddr) -> Result<(BlockAddr, usize)> {
    let bad = |why: &str| StoreError::Damaged(format!("block {addr} {why}"));
    if addr.0 < sb.groups_start {
        return Err(bad("is in the fixed area and has no reference count"));
    }
    let off = addr.0 - sb.groups_start;
    let (group, i) = (off / GROUP_BLOCKS, off % GROUP_BLOCKS);
    if group >= sb.groups {
        return Err(bad("lies past the end of the store"));
    }
    if i == 0 {
        return Err(bad("is a reference-count block, not an allocatable block"));
    }
    Ok((BlockAddr(addr.0 - i), META_HEADER_LEN + (i as usize - 1) * 4))
}

/// True if `addr` was in use at the instant of `frozen` (conservatively: true when that cannot
/// be told without reading the medium).
fn in_use_in_view(frozen: &Frozen, cache: &HashMap<u64, Entry>, addr: u64) -> bool {
    if addr >= frozen.sb.end_block() {
        return false; // in a group added since
    }
    let Ok((rc, at)) = refcount_slot(&frozen.sb, BlockAddr(addr)) else {
        return true; // a reference-count block: always part of the view
    };
    // A count block not kept is unchanged since the view; every allocation or free since
    // changed (and so kept) the count block first.
    let counts = match frozen.saved.get(&rc.0) {
        Some((data, _)) => data,
        None => match cache.get(&rc.0) {
            Some(e) => &e.data,
            None => return true,
        },
    };
    counts[at..at + 4] != [0; 4]
}

/// Drops a frozen view's kept blocks and releases its held ones; its reads fail with
/// [`StoreError::ViewOverrun`] from now on.
fn give_up_view(f: &mut Frozen) {
    tracing::warn!(kept = f.saved.len(), held = f.held_free.len(), "giving up a frozen view (online check)");
    f.overrun = true;
    f.saved = HashMap::default();
    f.freed_since = HashSet::default();
    f.held_free = HashSet::default();
}
