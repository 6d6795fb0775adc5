//! An open block store: creation, opening with journal recovery, commits and data I/O.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};

use crate::backend::{Backend, FileBackend};
use crate::format::{FORMAT_VERSION, GROUP_BLOCKS, USER_ROOTS};
use crate::io_epoch::{IoEpochs, IoGuard};
use crate::journal;
use crate::meta::Meta;
use crate::superblock::Superblock;
use crate::{BLOCK_SIZE, Block, BlockAddr, Result, StoreError};

/// Choices made when a store is created.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Blocks in each of the two journal slots; bounds the metadata one commit may change.
    pub journal_slot_blocks: u64,
    /// Largest size of the store in blocks (0: as large as the file system or device allows).
    pub max_blocks: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        // 2 × 32 MiB of journal: a commit may change 8 000 metadata blocks, which covers an
        // import of about 10 GiB of fresh data between commits.
        CreateOptions { journal_slot_blocks: 8192, max_blocks: 0 }
    }
}

/// Choices made when a store is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse every change; take a shared lock instead of an exclusive one.
    pub read_only: bool,
    /// Metadata blocks kept in memory (4 KiB each) beyond those changed since the last commit.
    pub cache_blocks: usize,
    /// Wait for another process's lock instead of failing at once.
    pub wait_for_lock: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { read_only: false, cache_blocks: 65536, wait_for_lock: false }
    }
}

/// What opening the store found in the journal.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Generation of the journal record replayed, if one was.
    pub replayed: Option<u64>,
    /// Block images written back to their homes.
    pub blocks_replayed: usize,
    /// Problems found and worked around (a damaged superblock copy, say).
    pub warnings: Vec<String>,
    /// The format version the store had when it was upgraded to the current one at open.
    pub upgraded_from: Option<u32>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// Generation now durable.
    pub generation: u64,
    /// Metadata blocks written: journaled, or (allocated since the last commit) written home
    /// before the record. 0 if nothing had changed and only data was synced.
    pub blocks: usize,
}

/// One Parallax block store: 4 KiB blocks, reference counts, atomic journaled commits.
///
/// Metadata is read under [`BlockStore::lock`] and changed only in a [`Transaction`]
/// ([`BlockStore::begin`]); finished transactions become durable, all together, at
/// [`BlockStore::commit`]. Data blocks are read and written directly with the `*_data` calls.
pub struct BlockStore {
    backend: Arc<dyn Backend>,
    meta: Mutex<Meta>,
    commit_lock: Mutex<()>,
    /// Signalled when a frozen view is closed (a freeze waiting for room may go on).
    pub(crate) view_closed: parking_lot::Condvar,
    /// Commits that have taken their snapshot of the metadata (group commit: a flush that finds
    /// a commit begun after it was called completed needs no commit of its own).
    commits_begun: AtomicU64,
    /// The index (in `commits_begun`) and result of the newest completed commit.
    last_commit: Mutex<(u64, CommitInfo)>,
    /// Data writes completed so far (counted after each returns).
    data_written: AtomicU64,
    /// The most of `data_written` a completed sync is known to cover: a flush that finds no
    /// metadata change and no data write since needs no sync of its own.
    data_synced: AtomicU64,
    /// Data I/O in flight, so that a commit reuses no block an I/O found before it was freed.
    io_epochs: IoEpochs,
    groups_start: u64,
    end_block: Arc<AtomicU64>,
    recovery: Recovery,
    /// What keeps other processes off the medium while the store is open: a file lock, or
    /// a lease ([`BlockStore::hold`]); dropped last.
    _lock: Option<Box<dyn Send + Sync>>,
}

/// A set of metadata changes that is applied together or not at all, in the manner of redb's
/// `WriteTransaction`.
///
/// It holds the store's metadata lock for its whole life, so nothing outside sees its partial
/// state, and it records what every block it touches was before, so that dropping it without
/// [`Transaction::finish`] — on an error, say — rolls back exactly its own changes and nobody
/// else's. A finished transaction becomes durable with the next [`BlockStore::commit`].
/// Keep transactions short: every other metadata reader and writer waits for them.
pub struct Transaction<'a> {
    meta: MutexGuard<'a, Meta>,
    finished: bool,
}

impl Transaction<'_> {
    /// Keeps the changes. Fails with [`StoreError::TransactionTooLarge`] — and rolls the
    /// transaction back — if the changes not yet committed would no longer fit one journal
    /// record: no transaction can leave the store unable to commit.
    pub fn finish(mut self) -> Result<()> {
        self.meta.cached_only = false;
        let capacity = self.meta.journal_capacity();
        let dirty = self.meta.next_record_blocks();
        if dirty > capacity {
            return Err(StoreError::TransactionTooLarge { blocks: dirty, capacity });
        }
        self.meta.end_undo();
        self.finished = true;
        Ok(())
    }

    /// Throws the changes away (the same as dropping the transaction).
    pub fn rollback(self) {}

    /// With `on`, a block that is not in memory is not read under the lock: the call needing
    /// it fails with [`StoreError::NotCached`], so the caller can drop the transaction, read
    /// the block with [`BlockStore::load`] and start again ([`BlockStore::with_transaction`]
    /// does all that). Cleared when the transaction ends.
    pub fn set_cached_only(&mut self, on: bool) {
        self.meta.cached_only = on;
    }
}

impl Deref for Transaction<'_> {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl DerefMut for Transaction<'_> {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.meta.cached_only = false;
        if !self.finished {
            self.meta.rollback();
        }
    }
}

/// The locked metadata with `cached_only` set, cleared again on drop (also by a panic).
struct CachedOnly<'a>(MutexGuard<'a, Meta>);

impl<'a> CachedOnly<'a> {
    fn new(mut meta: MutexGuard<'a, Meta>) -> Self {
        meta.cached_only = true;
        CachedOnly(meta)
    }
}

impl Drop for CachedOnly<'_> {
    fn drop(&mut self) {
        self.0.cached_only = false;
    }
}

/// How often a lookup or transaction is retried after a cache miss (the block read without the
/// lock in between) before its last attempt reads under the lock.
pub const MISS_RETRIES: usize = 8;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut u);
    }
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    for (i, b) in t.to_le_bytes().iter().enumerate() {
        u[i] ^= b;
    }
    u
}

/// True if `path` is an empty regular file, or a block device whose first two blocks (where
/// the superblocks go) are all zeros: a place a new store may be created without destroying
/// anything. A device holding anything else is never formatted implicitly.
pub fn is_blank(path: &Path) -> bool {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    let Ok(meta) = std::fs::metadata(path) else { return false };
    if meta.file_type().is_file() {
        return meta.len() == 0;
    }
    if !meta.file_type().is_block_device() {
        return false;
    }
    let mut head = vec![0u8; 2 * BLOCK_SIZE];
    match File::open(path).and_then(|f| f.read_exact_at(&mut head, 0)) {
        Ok(()) => head.iter().all(|&b| b == 0),
        Err(_) => false,
    }
}

impl BlockStore {
    /// Writes a new, empty store onto `backend` and opens it.
    pub fn create(backend: Arc<dyn Backend>, create: &CreateOptions, open: &OpenOptions) -> Result<BlockStore> {
        let slot = create.journal_slot_blocks;
        if !(16..=(1 << 24)).contains(&slot) {
            return Err(StoreError::Damaged(format!("journal slot of {slot} blocks: choose 16 to 16777216")));
        }
        let groups_start = 2 + 2 * slot;
        if create.max_blocks != 0 && create.max_blocks < groups_start + GROUP_BLOCKS {
            return Err(StoreError::NoSpace {
                detail: format!("a store needs at least {} blocks", groups_start + GROUP_BLOCKS),
            });
        }
        let fixed = groups_start * BLOCK_SIZE as u64;
        backend
            .extend(fixed)
            .and_then(|_| backend.reserve(0, fixed))
            .map_err(|e| StoreError::NoSpace { detail: format!("cannot reserve the superblocks and journal: {e}") })?;
        let now = now_secs();
        let sb = Superblock {
            version: FORMAT_VERSION,
            generation: 0,
            uuid: random_uuid(),
            journal_start: 2,
            journal_slot_blocks: slot,
            groups_start,
            groups: 0,
            max_blocks: create.max_blocks,
            allocated: 0,
            alloc_cursor: groups_start + 1,
            created_time: now,
            commit_time: now,
            user: [0; USER_ROOTS],
        };
        // Clear both journal headers so nothing older is mistaken for a record of this store.
        let zero = [0u8; BLOCK_SIZE];
        for s in 0..2 {
            backend
                .write_at((2 + s * slot) * BLOCK_SIZE as u64, &zero)
                .map_err(|e| StoreError::io("clearing the journal", e))?;
        }
        // The journal and the store's length are durable before a superblock names them, so
        // a power cut during creation leaves either no store or a whole one.
        backend.sync().map_err(|e| StoreError::io("syncing the new store's journal", e))?;
        for copy in 0..2u32 {
            backend
                .write_at(copy as u64 * BLOCK_SIZE as u64, sb.encode(copy).as_slice())
                .map_err(|e| StoreError::io("writing the superblock", e))?;
        }
        backend.sync().map_err(|e| StoreError::io("syncing the new store", e))?;
        BlockStore::open(backend, open)
    }

    /// Opens the store on `backend`, replaying the journal if the last commit's blocks may not
    /// all have reached their homes.
    pub fn open(backend: Arc<dyn Backend>, opts: &OpenOptions) -> Result<BlockStore> {
        let mut recovery = Recovery::default();
        let mut best: Option<Superblock> = None;
        let mut errors = Vec::new();
        for copy in 0..2u64 {
            let mut b = [0u8; BLOCK_SIZE];
            backend
                .read_at(copy * BLOCK_SIZE as u64, &mut b)
                .map_err(|e| StoreError::io("reading the superblock", e))?;
            match Superblock::decode(&b, BlockAddr(copy)) {
                Ok(sb) => {
                    if best.as_ref().is_none_or(|x| sb.generation > x.generation) {
                        best = Some(sb);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let Some(mut sb) = best else {
            // Neither copy is usable: report the most telling reason.
            let e = errors
                .into_iter()
                .find(|e| !matches!(e, StoreError::NotAStore(_)))
                .unwrap_or_else(|| StoreError::NotAStore("no Parallax superblock in block 0 or 1".into()));
            return Err(e);
        };
        for e in errors {
            recovery.warnings.push(format!("one superblock copy is unusable: {e}"));
        }
        let mut records: Vec<journal::Record> = Vec::new();
        for slot in 0..2 {
            if let Some(r) = journal::read_slot(&*backend, sb.journal_start, sb.journal_slot_blocks, slot)? {
                records.push(r);
            }
        }
        records.sort_by_key(|r| r.generation);
        // The newest record is replayed, and the one before it too when it is the previous
        // generation: its home writes were issued without a sync of their own, so the newest
        // record may have become durable while some of them were lost (docs/format.md §5).
        if records.len() == 2 && records[0].generation + 1 != records[1].generation {
            records.remove(0);
        }
        let mut overlay = rustc_hash::FxHashMap::default();
        match records.last() {
            Some(newest) if newest.generation >= sb.generation => {
                let mut last_sb = None;
                for rec in &records {
                    last_sb = Some(check_record(rec, &sb)?);
                }
                let rec_sb = last_sb.ok_or_else(|| StoreError::Damaged("no journal record to replay".into()))?;
                for rec in &records {
                    for (addr, img) in &rec.images {
                        if opts.read_only {
                            overlay.insert(addr.0, img.clone());
                        } else {
                            backend
                                .write_at(addr.byte_offset(), img.as_slice())
                                .map_err(|e| StoreError::io("replaying the journal", e))?;
                        }
                    }
                    recovery.blocks_replayed += rec.images.len();
                }
                if !opts.read_only {
                    backend.sync().map_err(|e| StoreError::io("syncing the replayed journal", e))?;
                }
                recovery.replayed = Some(newest.generation);
                sb = rec_sb;
            }
            _ if sb.generation > 0 => {
                recovery.warnings.push(format!(
                    "the journal holds no intact record of generation {}; using the superblock as it stands",
                    sb.generation
                ));
            }
            _ => {}
        }
        let end = sb.end_block();
        let have = backend.size().map_err(|e| StoreError::io("finding the store's size", e))?;
        if have < end * BLOCK_SIZE as u64 {
            return Err(StoreError::Damaged(format!(
                "the store is truncated: it holds {have} bytes but its superblock describes {} bytes",
                end * BLOCK_SIZE as u64
            )));
        }
        let groups_start = sb.groups_start;
        let end_block = Arc::new(AtomicU64::new(end));
        let old_version = sb.version;
        let generation = sb.generation;
        let mut meta = Meta::new(backend.clone(), sb, opts.cache_blocks, opts.read_only, end_block.clone());
        meta.overlay = overlay;
        let upgrade = old_version < FORMAT_VERSION && !opts.read_only;
        if upgrade {
            // The next commit writes the current version; make it now so the store is never
            // again opened by a build that follows the old protocol.
            meta.sb.version = FORMAT_VERSION;
            recovery.upgraded_from = Some(old_version);
        }
        let store = BlockStore {
            backend,
            meta: Mutex::new(meta),
            commit_lock: Mutex::new(()),
            view_closed: parking_lot::Condvar::new(),
            commits_begun: AtomicU64::new(0),
            // Not known synced at open: the first flush syncs.
            data_written: AtomicU64::new(1),
            data_synced: AtomicU64::new(0),
            last_commit: Mutex::new((0, CommitInfo { generation, blocks: 0 })),
            io_epochs: IoEpochs::default(),
            groups_start,
            end_block,
            recovery,
            _lock: None,
        };
        if upgrade {
            store.commit()?;
            tracing::info!("upgraded the store from format version {old_version} to {FORMAT_VERSION}");
        }
        Ok(store)
    }

    /// Opens the store in the file or block device at `path`, creating a file store there with
    /// `create` if nothing exists yet. The store is locked: exclusively for writing, shared for
    /// reading; another process's conflicting lock gives [`StoreError::Locked`].
    pub fn open_path(path: &Path, opts: &OpenOptions, create: Option<&CreateOptions>) -> Result<BlockStore> {
        let exists = path.exists();
        if !exists && create.is_none() {
            return Err(StoreError::io(
                format!("opening {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no store there"),
            ));
        }
        let writable = !opts.read_only || !exists;
        let fb = FileBackend::open(path, writable, !exists)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        let lock_file = fb.file().try_clone().map_err(|e| StoreError::io("duplicating the store's handle", e))?;
        let shared = opts.read_only && exists;
        let locked = match (shared, opts.wait_for_lock) {
            (true, true) => lock_file.lock_shared().map(|_| true),
            (false, true) => lock_file.lock().map(|_| true),
            (true, false) => match lock_file.try_lock_shared() {
                Ok(()) => Ok(true),
                Err(std::fs::TryLockError::WouldBlock) => Ok(false),
                Err(std::fs::TryLockError::Error(e)) => Err(e),
            },
            (false, false) => match lock_file.try_lock() {
                Ok(()) => Ok(true),
                Err(std::fs::TryLockError::WouldBlock) => Ok(false),
                Err(std::fs::TryLockError::Error(e)) => Err(e),
            },
        }
        .map_err(|e| StoreError::io("locking the store", e))?;
        if !locked {
            return Err(StoreError::Locked {
                path: path.display().to_string(),
                detail: if shared { "it is being changed".into() } else { "it is open elsewhere".into() },
            });
        }
        let backend: Arc<dyn Backend> = Arc::new(fb);
        let empty = exists && is_blank(path);
        let mut store = match create {
            Some(c) if !exists || empty => BlockStore::create(backend, c, opts)?,
            _ => BlockStore::open(backend, opts)?,
        };
        store._lock = Some(Box::new(lock_file));
        Ok(store)
    }

    /// Keeps `holder` — a lock or lease that keeps other writers off the medium — for as long
    /// as the store is open; it is dropped after everything else of the store.
    pub fn hold(&mut self, holder: Box<dyn Send + Sync>) {
        self._lock = Some(holder);
    }

    /// What opening the store found and repaired from the journal.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Locks the metadata for reading. Hold it briefly: I/O waits on it. Changes need a
    /// [`Transaction`] ([`BlockStore::begin`]); through this guard they fail with
    /// [`StoreError::NoTransaction`].
    pub fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock()
    }

    /// Runs `f` on the locked metadata without reading the medium under the lock: when `f`
    /// needs a block that is not in memory, the lock is dropped, the block read and verified,
    /// and `f` run again. For lookups on the I/O path, so one VM's cache miss never stalls the
    /// others. `f` must not change metadata (use [`BlockStore::with_transaction`]).
    pub fn with_cached<T>(&self, f: impl FnMut(&mut Meta) -> Result<T>) -> Result<T> {
        Ok(self.retry_misses(|| (), f)?.1)
    }

    /// [`BlockStore::with_cached`] holding an [`BlockStore::io_guard`] when `f` succeeds. The
    /// guard is released while a missing block is read, so a cache miss does not hold up a
    /// commit (which waits for the guards taken before it).
    pub fn with_cached_guarded<T>(&self, f: impl FnMut(&mut Meta) -> Result<T>) -> Result<(IoGuard<'_>, T)> {
        self.retry_misses(|| self.io_guard(), f)
    }

    /// [`BlockStore::with_cached_guarded`] that never reads the medium: `Ok(None)` when `f`
    /// needs a block that is not in memory. For a caller that hands such a request to a thread
    /// that may wait instead (a connection's reader).
    pub fn try_cached_guarded<T>(&self, f: impl FnOnce(&mut Meta) -> Result<T>) -> Result<Option<(IoGuard<'_>, T)>> {
        let held = self.io_guard();
        let attempt = {
            let mut m = CachedOnly::new(self.meta.lock());
            f(&mut m.0)
        };
        match attempt {
            Err(StoreError::NotCached { .. }) => Ok(None),
            other => Ok(Some((held, other?))),
        }
    }

    /// Runs `f` with `hold()` held and `cached_only` set; on a miss, drops both, reads the
    /// block and tries again. After [`MISS_RETRIES`] misses (a tiny cache on a busy store) the
    /// last attempt reads under the lock.
    fn retry_misses<G, T>(
        &self,
        mut hold: impl FnMut() -> G,
        mut f: impl FnMut(&mut Meta) -> Result<T>,
    ) -> Result<(G, T)> {
        for _ in 0..MISS_RETRIES {
            let held = hold();
            let attempt = {
                let mut m = CachedOnly::new(self.meta.lock());
                f(&mut m.0)
            };
            match attempt {
                Err(StoreError::NotCached { addr, meta_kind, epoch }) => {
                    drop(held);
                    self.load(addr, meta_kind, epoch)?;
                }
                other => return Ok((held, other?)),
            }
        }
        let held = hold();
        let value = f(&mut self.meta.lock())?;
        Ok((held, value))
    }

    /// Runs `f` in a transaction and finishes it, reading blocks that are not in memory without
    /// the lock: on a miss the transaction is rolled back (only its own changes), the block read
    /// and `f` run again from the start.
    pub fn with_transaction<T>(&self, mut f: impl FnMut(&mut Transaction<'_>) -> Result<T>) -> Result<T> {
        for attempt in 0..=MISS_RETRIES {
            let mut txn = self.begin()?;
            // Cleared again when the transaction finishes or is dropped (even by a panic).
            txn.set_cached_only(attempt < MISS_RETRIES);
            match f(&mut txn) {
                Ok(v) => {
                    txn.finish()?;
                    return Ok(v);
                }
                Err(StoreError::NotCached { addr, meta_kind, epoch }) => {
                    drop(txn);
                    self.load(addr, meta_kind, epoch)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Damaged("a transaction kept missing the cache".into()))
    }

    /// Reads metadata block `addr`, which a walk missed at commit epoch `missed_at` (both from
    /// [`StoreError::NotCached`]), into the cache without holding the metadata lock while the
    /// medium is read; the caller then walks again. A read is cached only if no commit wrote
    /// blocks home while it ran.
    ///
    /// The walk found `addr` referenced, but it dropped the lock to come here, and a block
    /// can be unlinked, its free committed and the block reused meanwhile — never without a
    /// commit moving the epoch on first. So a block failing verification after the epoch moved
    /// is no damage: the walk starts again from what is current. If the epoch did not move, the
    /// block is still the one the walk needs and the locked read reports the damage.
    pub fn load(&self, addr: BlockAddr, kind: &'static crate::MetaKind, missed_at: u64) -> Result<()> {
        for _ in 0..3 {
            let epoch = {
                let m = self.meta.lock();
                if m.is_cached(addr) || m.is_pending_free(addr) {
                    return Ok(());
                }
                m.home_epoch
            };
            let mut data = Arc::new([0u8; BLOCK_SIZE]);
            self.backend
                .read_at(addr.byte_offset(), Arc::make_mut(&mut data).as_mut_slice())
                .map_err(|e| StoreError::io(format!("reading {} block {addr}", kind.name), e))?;
            if (kind.verify)(&data, addr).is_err() {
                if self.meta.lock().home_epoch != missed_at {
                    // A commit completed since the walk missed the block: it may have been
                    // freed and reused since. Not damage: the walk starts again.
                    return Ok(());
                }
                break; // damaged: let the locked read report it
            }
            if self.meta.lock().insert_loaded(addr, kind, data, epoch) {
                return Ok(());
            }
            // A commit wrote blocks home meanwhile: read again.
        }
        self.meta.lock().read(addr, kind)?;
        Ok(())
    }

    /// Starts a transaction: the metadata lock is held until it is finished or dropped.
    pub fn begin(&self) -> Result<Transaction<'_>> {
        let mut meta = self.meta.lock();
        if meta.poisoned {
            return Err(StoreError::Poisoned);
        }
        if meta.read_only {
            return Err(StoreError::ReadOnly);
        }
        meta.begin_undo();
        Ok(Transaction { meta, finished: false })
    }

    /// A guard to hold while reading or writing data blocks found through metadata, taken
    /// before the lookup: blocks freed meanwhile are not handed out again until every guard
    /// taken before is dropped. Taking one never waits, not even for a commit.
    pub fn io_guard(&self) -> IoGuard<'_> {
        self.io_epochs.enter()
    }

    /// Makes every finished transaction so far durable, atomically, along with every completed
    /// data write. Concurrent callers share commits (group commit): a caller returns as soon as
    /// a commit that began after its call has completed. On an I/O error the store refuses
    /// further use until reopened.
    ///
    /// The order of writes and syncs is what makes a power cut at any instant safe
    /// (docs/format.md §5): (1) sync — data written for this commit, new groups and the
    /// previous commit's home writes become durable before anything can refer to them;
    /// (2) write the journal record, sync — the commit point; (3) write the blocks home,
    /// unsynced (the next commit's first sync covers them, and until then recovery replays
    /// this record too).
    pub fn commit(&self) -> Result<CommitInfo> {
        // Nothing written since a completed sync and nothing changed: already durable. (Guests
        // send FLUSH far more often than they write — fio at queue depth 16 with a FLUSH every
        // 32 writes sends one per three writes — and an idle fdatasync still costs a device
        // cache flush.)
        if self.data_written.load(Ordering::Acquire) <= self.data_synced.load(Ordering::Acquire) {
            let m = self.meta.lock();
            if m.poisoned {
                return Err(StoreError::Poisoned);
            }
            if !m.read_only && !m.has_changes() {
                return Ok(CommitInfo { generation: m.committed.generation, blocks: 0 });
            }
        }
        let wanted = self.commits_begun.load(Ordering::Acquire) + 1;
        let _serial = self.commit_lock.lock();
        {
            let last = self.last_commit.lock();
            if last.0 >= wanted {
                return Ok(last.1);
            }
        }
        let index = self.commits_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let (images, generation, sb_snapshot) = {
            let mut m = self.meta.lock();
            if m.poisoned {
                return Err(StoreError::Poisoned);
            }
            if m.read_only {
                return Err(StoreError::ReadOnly);
            }
            assert!(m.undo.is_none(), "a commit never sees an open transaction");
            if !m.has_changes() {
                let generation = m.committed.generation;
                drop(m);
                self.sync_data_writes().map_err(|e| self.poison(e))?;
                let info = CommitInfo { generation, blocks: 0 };
                *self.last_commit.lock() = (index, info);
                return Ok(info);
            }
            let images = m.begin_commit();
            let need = journal::record_blocks(images.journaled.len() + 1);
            // Transactions check this when they finish, so it cannot happen.
            assert!(
                need as u64 <= m.sb.journal_slot_blocks,
                "{} dirty blocks outgrew a journal slot of {} blocks",
                images.journaled.len(),
                m.sb.journal_slot_blocks
            );
            m.sb.generation += 1;
            m.sb.commit_time = now_secs();
            let frees = std::mem::take(&mut m.pending_free);
            m.committing_free.extend(frees);
            m.committing_user = Some(m.sb.user);
            (images, m.sb.generation, m.sb.clone())
        };
        // Race tests stop a commit here to show that transactions go on while it copies.
        test_point!("blockstore::commit::sealing");
        let images = images.seal();
        let copy = (generation % 2) as u32;
        let sb_image = sb_snapshot.encode(copy);
        let mut record: Vec<(BlockAddr, &Block)> = images.journaled.iter().map(|(a, img, _)| (*a, &**img)).collect();
        record.push((BlockAddr(copy as u64), &sb_image));
        // Blocks allocated since the last commit began go home now, unjournaled: free in the
        // committed state, nothing durable refers to them and no record replay rewrites them,
        // so — like new data — they need only be durable before the record naming them, which
        // the sync below makes them (format.md §5, step 2). A copy-on-write's node copies are
        // such blocks: this halves what they cost the medium.
        let new_home = write_runs(&*self.backend, images.new.iter().map(|(a, img, _)| (*a, &**img)))
            .map_err(|e| StoreError::io("writing new blocks", e));
        let durable = new_home
            .and_then(|_| self.sync_data_writes())
            .and_then(|_| {
                journal::write_record(
                    &*self.backend,
                    sb_snapshot.journal_start,
                    sb_snapshot.journal_slot_blocks,
                    generation,
                    &record,
                )
            })
            .and_then(|_| self.backend.sync().map_err(|e| StoreError::io("syncing the journal", e)));
        if let Err(e) = durable {
            return Err(self.poison(e));
        }
        // Dirty blocks stay cached (and are never read from the medium) until marked clean
        // below, so the home writes need no lock.
        if let Err(e) = write_runs(&*self.backend, record.iter().copied()) {
            return Err(self.poison(StoreError::io("writing committed blocks home", e)));
        }
        {
            let mut m = self.meta.lock();
            let written: Vec<(BlockAddr, u64)> =
                images.new.iter().chain(&images.journaled).map(|(a, _, v)| (*a, *v)).collect();
            m.mark_clean(&written);
            m.committed = sb_snapshot.clone();
            m.committing_user = None;
        }
        // Blocks freed by this commit may be reused once no reader that found them is left.
        // I/O that began since does not wait: it cannot have found them.
        self.io_epochs.wait_for_earlier();
        self.meta.lock().release_committed_frees();
        let info = CommitInfo { generation, blocks: images.new.len() + images.journaled.len() };
        *self.last_commit.lock() = (index, info);
        Ok(info)
    }

    fn poison(&self, e: StoreError) -> StoreError {
        self.meta.lock().poisoned = true;
        tracing::error!("commit failed, store needs reopening: {e}");
        e
    }

    fn check_data_range(&self, addr: BlockAddr, offset: usize, len: usize) -> Result<()> {
        let end = self.end_block.load(Ordering::Acquire);
        let blocks = (offset + len).div_ceil(BLOCK_SIZE).max(1) as u64;
        if addr.0 <= self.groups_start || addr.0 + blocks > end {
            return Err(StoreError::OutOfRange(addr));
        }
        let first = (addr.0 - self.groups_start) % GROUP_BLOCKS;
        // A run may not cover a reference-count block.
        if first == 0 || first + blocks > GROUP_BLOCKS {
            return Err(StoreError::OutOfRange(addr));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of data starting `offset` bytes into block `addr` (the range
    /// may span consecutive blocks of one group).
    pub fn read_data(&self, addr: BlockAddr, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.read_data_vectored(addr, offset, &mut [IoSliceMut::new(buf)])
    }

    /// [`BlockStore::read_data`] into several buffers, in order, as one read of their total
    /// length (one `preadv` on a file).
    pub fn read_data_vectored(&self, addr: BlockAddr, offset: usize, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.check_data_range(addr, offset, bufs.iter().map(|b| b.len()).sum())?;
        self.backend
            .read_vectored_at(addr.byte_offset() + offset as u64, bufs)
            .map_err(|e| StoreError::io(format!("reading data block {addr}"), e))
    }

    /// [`BlockStore::read_data_vectored`] only if it needs no wait for the medium
    /// ([`Backend::try_read_vectored_at`]): `Ok(false)` when it would have waited, leaving
    /// `bufs` holding anything.
    pub fn try_read_data_vectored(&self, addr: BlockAddr, offset: usize, bufs: &mut [IoSliceMut<'_>]) -> Result<bool> {
        self.check_data_range(addr, offset, bufs.iter().map(|b| b.len()).sum())?;
        self.backend
            .try_read_vectored_at(addr.byte_offset() + offset as u64, bufs)
            .map_err(|e| StoreError::io(format!("reading data block {addr}"), e))
    }

    /// Writes `data` starting `offset` bytes into block `addr` (may span consecutive blocks).
    pub fn write_data(&self, addr: BlockAddr, offset: usize, data: &[u8]) -> Result<()> {
        self.write_data_vectored(addr, offset, &[IoSlice::new(data)])
    }

    /// [`BlockStore::write_data`] from several buffers, in order, as one write of their total
    /// length (one `pwritev` on a file).
    pub fn write_data_vectored(&self, addr: BlockAddr, offset: usize, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_data_range(addr, offset, bufs.iter().map(|b| b.len()).sum())?;
        let written = self.backend.write_vectored_at(addr.byte_offset() + offset as u64, bufs);
        // Counted even if it failed: part of it may have reached the medium.
        self.data_written.fetch_add(1, Ordering::AcqRel);
        written.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => {
                StoreError::NoSpace { detail: format!("writing data block {addr}: {e}") }
            }
            _ => StoreError::io(format!("writing data block {addr}"), e),
        })
    }

    /// Makes completed data writes durable without committing metadata.
    pub fn sync_data(&self) -> Result<()> {
        self.sync_data_writes().map_err(|e| self.poison(e))
    }

    /// Syncs the medium and notes which data writes the sync covered: those completed before it
    /// began.
    fn sync_data_writes(&self) -> Result<()> {
        let covered = self.data_written.load(Ordering::Acquire);
        self.backend.sync().map_err(|e| StoreError::io("syncing data", e))?;
        self.data_synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// The medium under the store, for asking how close to full its file system, device or
    /// pool is ([`RoomSource::room`]). Asking takes no lock of the store, and the source does
    /// not keep the store open: a thread may hold it to keep the figures fresh.
    pub fn room_source(&self) -> RoomSource {
        RoomSource { backend: Arc::downgrade(&self.backend), end_block: self.end_block.clone() }
    }

    /// The backend, for tools that inspect raw blocks.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

/// The medium under a store, for asking its room ([`BlockStore::room_source`]). It does not
/// keep the medium open: once the store is closed (and its lock or lease let go) it answers
/// `None`, and a query running then holds the medium only until it returns.
#[derive(Clone)]
pub struct RoomSource {
    backend: std::sync::Weak<dyn Backend>,
    end_block: Arc<AtomicU64>,
}

impl RoomSource {
    /// [`Backend::room`], given the store's size as it is now; `None` once the store is closed.
    pub fn room(&self) -> Result<Option<crate::MediumRoom>> {
        let Some(backend) = self.backend.upgrade() else { return Ok(None) };
        let store_bytes = self.end_block.load(Ordering::Acquire).saturating_mul(BLOCK_SIZE as u64);
        backend.room(store_bytes).map_err(|e| StoreError::io("asking the medium how much room it has", e))
    }
}

/// Checks a journal record before it is replayed: its last image is this store's superblock of
/// the record's generation, and every image's home lies inside the store. Returns that
/// superblock.
fn check_record(rec: &journal::Record, sb: &Superblock) -> Result<Superblock> {
    let (last_addr, last_img) = rec.images.last().ok_or_else(|| StoreError::Damaged("empty journal record".into()))?;
    let rec_sb = Superblock::decode(last_img, *last_addr)?;
    if rec_sb.generation != rec.generation || rec_sb.uuid != sb.uuid {
        return Err(StoreError::Damaged(format!(
            "journal record {} does not belong to this store's superblock",
            rec.generation
        )));
    }
    for (addr, _) in &rec.images {
        if addr.0 >= 2 && addr.0 < rec_sb.groups_start || addr.0 >= rec_sb.end_block() {
            return Err(StoreError::Damaged(format!("journal record names block {addr} outside the store")));
        }
    }
    Ok(rec_sb)
}

/// The most blocks [`write_runs`] writes with one request (1 MiB).
const RUN_BLOCKS: usize = 256;

/// Writes each block image at its address, blocks at consecutive addresses (in the order
/// given) with one vectored write of up to [`RUN_BLOCKS`]: one `pwritev` (one round trip on
/// RADOS) per run instead of one per block. Runs are short under copy-on-write after
/// snapshots (node copies go beside the nodes they copy, count blocks are one per group:
/// 1.7 blocks on average, docs/performance.md) and long for metadata allocated together
/// (an import, a new VDI). Unsynced like any write; a crash may tear it anywhere.
fn write_runs<'a>(backend: &dyn Backend, blocks: impl Iterator<Item = (BlockAddr, &'a Block)>) -> std::io::Result<()> {
    let mut run: Vec<IoSlice<'a>> = Vec::with_capacity(RUN_BLOCKS);
    let mut first = BlockAddr(0);
    for (addr, img) in blocks {
        if !run.is_empty() && (addr.0 != first.0 + run.len() as u64 || run.len() == RUN_BLOCKS) {
            backend.write_vectored_at(first.byte_offset(), &run)?;
            run.clear();
        }
        if run.is_empty() {
            first = addr;
        }
        run.push(IoSlice::new(img.as_slice()));
    }
    if !run.is_empty() {
        backend.write_vectored_at(first.byte_offset(), &run)?;
    }
    Ok(())
}
