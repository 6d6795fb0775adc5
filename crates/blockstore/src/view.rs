//! Read access to metadata, live or frozen: how checkers walk a store that stays in use.
//!
//! [`MetaRead`] is what a walk over metadata needs: blocks by address and kind, and the
//! superblock. [`crate::Meta`] implements it (the live metadata, under the lock), and so does
//! [`FrozenView`]: the metadata exactly as it was when the view was taken, read *without*
//! holding the metadata lock across the walk, while transactions and commits go on.
//!
//! A view is consistent because it is taken between transactions (they hold the lock for their
//! whole life) and, while it is open, the store keeps for it the old contents of every metadata
//! block that changes or is freed, and hands out no block whose freeing became durable (so a
//! freed block's old contents stay on the medium). A block the view has not kept is unchanged
//! since the view was taken: it is read from the cache or the medium.

use crate::format::{GROUP_BLOCKS, META_HEADER_LEN, REFCOUNTS_PER_BLOCK, USER_ROOTS};
use crate::meta::{FROZEN_KEPT_BLOCKS, refcount_slot};
use crate::superblock::Superblock;
use crate::{BLOCK_SIZE, Block, BlockAddr, BlockStore, Meta, MetaKind, REFCOUNT_KIND, Result, StoreError};

/// Read access to a store's metadata: the live [`Meta`] or a [`FrozenView`].
pub trait MetaRead {
    /// Metadata block `addr`, verified as `kind`.
    fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block>;

    /// The superblock this metadata belongs to.
    fn superblock(&self) -> &Superblock;

    /// The upper layer's root or counter in slot `i` (0..16).
    fn user(&self, i: usize) -> u64 {
        self.superblock().user[i % USER_ROOTS]
    }

    /// The reference count of `addr`.
    fn refcount(&mut self, addr: BlockAddr) -> Result<u32> {
        let (rc, at) = refcount_slot(self.superblock(), addr)?;
        let b = self.read(rc, &REFCOUNT_KIND)?;
        Ok(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
    }

    /// Every allocatable block with a non-zero count, in address order, with its count.
    fn all_refcounts(&mut self) -> Result<Vec<(BlockAddr, u32)>> {
        let (groups, groups_start) = (self.superblock().groups, self.superblock().groups_start);
        let mut out = Vec::new();
        for g in 0..groups {
            let rc = BlockAddr(groups_start + g * GROUP_BLOCKS);
            let b = self.read(rc, &REFCOUNT_KIND)?;
            for i in 0..REFCOUNTS_PER_BLOCK as usize {
                let at = META_HEADER_LEN + i * 4;
                let c = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                if c != 0 {
                    out.push((BlockAddr(rc.0 + 1 + i as u64), c));
                }
            }
        }
        Ok(out)
    }
}

impl MetaRead for Meta {
    fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block> {
        Meta::read(self, addr, kind)
    }

    fn superblock(&self) -> &Superblock {
        Meta::superblock(self)
    }
}

/// The locked live metadata, as [`crate::BlockStore::lock`] returns it.
impl MetaRead for parking_lot::MutexGuard<'_, Meta> {
    fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block> {
        Meta::read(self, addr, kind)
    }

    fn superblock(&self) -> &Superblock {
        Meta::superblock(self)
    }
}

/// The metadata as an open transaction sees it.
impl MetaRead for crate::Transaction<'_> {
    fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block> {
        Meta::read(self, addr, kind)
    }

    fn superblock(&self) -> &Superblock {
        Meta::superblock(self)
    }
}

/// The store's metadata frozen at one instant, for checking a store in use: walks read it
/// without holding the metadata lock, so guests' I/O, transactions and commits go on. Up to
/// eight views may be open at once (each keeps its own copies; a ninth waits); one is released
/// when dropped. While it is open, blocks freed are not reused, and
/// the old contents of changed metadata blocks are kept in memory. Past its limits (see
/// [`BlockStore::freeze_with_limit`]), or when a write needs the space it holds, the view is
/// given up: its reads fail with [`StoreError::ViewOverrun`].
pub struct FrozenView<'a> {
    store: &'a BlockStore,
    id: u64,
    sb: Superblock,
    buf: Box<Block>,
}

/// Most frozen views open at once on one store.
const MAX_VIEWS: usize = 8;

/// Ids of frozen views (unique in the process).
static NEXT_VIEW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Where a block of the view was found.
enum Found {
    /// Copied into the view's buffer.
    Copied,
    /// Not in memory: read the medium, then look again.
    Missing,
}

impl BlockStore {
    /// Freezes the metadata as of now (between transactions) for a consistent walk that does
    /// not hold the metadata lock. If eight views are open, waits until one is closed.
    /// Keeps at most 32 Ki changed blocks (128 MiB of memory).
    pub fn freeze(&self) -> Result<FrozenView<'_>> {
        self.freeze_with_limit(FROZEN_KEPT_BLOCKS)
    }

    /// [`BlockStore::freeze`], keeping at most `kept_blocks` changed blocks in memory.
    pub fn freeze_with_limit(&self, kept_blocks: usize) -> Result<FrozenView<'_>> {
        let mut m = self.lock();
        if m.poisoned {
            return Err(StoreError::Poisoned);
        }
        // Eight walks at once: a ninth waits for one to end.
        while m.frozen.len() >= MAX_VIEWS {
            self.view_closed.wait(&mut m);
        }
        assert!(m.undo.is_none(), "a transaction holds the lock for its whole life");
        let sb = m.sb.clone();
        let id = NEXT_VIEW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.frozen.push(crate::meta::Frozen {
            id,
            sb: sb.clone(),
            saved: Default::default(),
            freed_since: Default::default(),
            held_free: Default::default(),
            kept_limit: kept_blocks,
            overrun: false,
        });
        Ok(FrozenView { store: self, id, sb, buf: Box::new([0; BLOCK_SIZE]) })
    }
}

impl FrozenView<'_> {
    /// Copies `addr` into the buffer if the view has it in memory (kept, cached or replayed).
    fn find(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<Found> {
        let m = self.store.lock();
        if m.poisoned {
            return Err(StoreError::Poisoned);
        }
        let frozen = m
            .frozen
            .iter()
            .find(|f| f.id == self.id)
            .ok_or_else(|| StoreError::Damaged("a frozen view lost its state".into()))?;
        if frozen.overrun {
            return Err(StoreError::ViewOverrun);
        }
        if addr.0 < self.sb.groups_start || addr.0 >= self.sb.end_block() {
            return Err(StoreError::Corrupt {
                kind: kind.name,
                addr,
                reason: format!("address outside the store's {} blocks", self.sb.end_block()),
            });
        }
        let wrong_kind = |found: &MetaKind| StoreError::Corrupt {
            kind: kind.name,
            addr,
            reason: format!("block is in use as a {} block", found.name),
        };
        if let Some((data, k)) = frozen.saved.get(&addr.0) {
            if !std::ptr::eq(*k, kind) {
                return Err(wrong_kind(k));
            }
            self.buf.copy_from_slice(data.as_slice());
            return Ok(Found::Copied);
        }
        if let Some((data, k)) = m.cached_entry(addr.0) {
            if !std::ptr::eq(k, kind) {
                return Err(wrong_kind(k));
            }
            self.buf.copy_from_slice(data.as_slice());
            return Ok(Found::Copied);
        }
        if let Some(img) = m.overlay.get(&addr.0) {
            self.buf.copy_from_slice(img.as_slice());
            (kind.verify)(&self.buf, addr).map_err(|reason| StoreError::Corrupt { kind: kind.name, addr, reason })?;
            return Ok(Found::Copied);
        }
        Ok(Found::Missing)
    }

    fn read_medium(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<()> {
        self.store
            .backend()
            .read_at(addr.byte_offset(), self.buf.as_mut_slice())
            .map_err(|e| StoreError::io(format!("reading {} block {addr}", kind.name), e))
    }

    fn verify(&self, addr: BlockAddr, kind: &'static MetaKind) -> Result<()> {
        (kind.verify)(&self.buf, addr).map_err(|reason| StoreError::Corrupt { kind: kind.name, addr, reason })
    }
}

impl FrozenView<'_> {
    /// Fails with [`StoreError::ViewOverrun`] if the view was given up: a walk that ends
    /// should ask, since the errors it met on the way may have come from that.
    pub fn still_valid(&self) -> Result<()> {
        match self.store.lock().frozen.iter().find(|f| f.id == self.id) {
            Some(f) if !f.overrun => Ok(()),
            _ => Err(StoreError::ViewOverrun),
        }
    }
}

impl MetaRead for FrozenView<'_> {
    fn read(&mut self, addr: BlockAddr, kind: &'static MetaKind) -> Result<&Block> {
        if let Found::Missing = self.find(addr, kind)? {
            // Not in memory, so unchanged since the view and not being written home. If it
            // changes while the medium is read, it is kept first: look again.
            self.read_medium(addr, kind)?;
            if let Found::Missing = self.find(addr, kind)? {
                self.verify(addr, kind)?;
            }
        }
        Ok(&self.buf)
    }

    fn superblock(&self) -> &Superblock {
        &self.sb
    }
}

impl Drop for FrozenView<'_> {
    fn drop(&mut self) {
        // Blocks held for the view become reusable.
        self.store.lock().frozen.retain(|f| f.id != self.id);
        self.store.view_closed.notify_one();
    }
}
