//! Reading and writing VDIs and snapshots: the [`blockdev::BlockDevice`] implementations.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockdev::{BlockDevice, DevError, DevResult, Extent, ExtentKind, TryRead, check_range};
use blockstore::{BLOCK_SIZE, BlockAddr, BlockStore};
use radix::Mapping;

use crate::io_stats::{HandleReport, HandleStats, IoOp, handle_report};
use crate::registry::{Registry, Source, VdiLive};
use crate::scatter::{ReadBufs, WriteBufs};
use crate::{Result, SnapshotId, VdiError, VdiId};

const BS: u64 = BLOCK_SIZE as u64;

/// One block-sized piece of a request.
#[derive(Clone, Copy)]
struct Piece {
    vblock: u64,
    /// Offset inside the block.
    at: usize,
    /// Offset inside the caller's buffer.
    buf: usize,
    len: usize,
}

fn pieces(offset: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let abs = offset + pos as u64;
        let at = (abs % BS) as usize;
        let n = (BLOCK_SIZE - at).min(len - pos);
        let p = Piece { vblock: abs / BS, at, buf: pos, len: n };
        pos += n;
        Some(p)
    })
}

/// Where each piece lives, looked up in `meta`.
fn lookup_all(meta: &mut blockstore::Meta, root: BlockAddr, list: &[Piece]) -> blockstore::Result<Vec<Mapping>> {
    list.iter().map(|p| radix::lookup(meta, root, p.vblock)).collect()
}

/// Where each piece lives. Blocks of the tree that are not in memory are read without the
/// metadata lock ([`BlockStore::with_cached`]), so a cache miss stalls only this request.
fn lookups(store: &BlockStore, root: BlockAddr, list: &[Piece]) -> Result<Vec<Mapping>> {
    Ok(store.with_cached(|meta| lookup_all(meta, root, list))?)
}

/// [`lookups`] holding an I/O guard (which keeps blocks freed meanwhile from reuse); a miss is
/// read with the guard released ([`BlockStore::with_cached_guarded`]).
fn gated_lookups<'a>(
    store: &'a BlockStore,
    root: BlockAddr,
    list: &[Piece],
) -> Result<(blockstore::IoGuard<'a>, Vec<Mapping>)> {
    Ok(store.with_cached_guarded(|meta| lookup_all(meta, root, list))?)
}

/// End (exclusive) of the run of pieces starting at `i` that one read serves: unmapped pieces
/// in a row, or mapped pieces stored in consecutive blocks.
fn run_end(maps: &[Mapping], i: usize) -> usize {
    let mut j = i + 1;
    while j < maps.len()
        && match (maps[i], maps[j]) {
            (Mapping::Unmapped, Mapping::Unmapped) => true,
            (Mapping::Mapped { addr, .. }, Mapping::Mapped { addr: a, .. }) => a.0 == addr.0 + (j - i) as u64,
            _ => false,
        }
    {
        j += 1;
    }
    j
}

/// Reads `buf.len()` bytes at `offset` of the tree at `root`, coalescing adjacent blocks.
pub(crate) fn read_tree(store: &BlockStore, root: BlockAddr, offset: u64, buf: &mut [u8]) -> Result<()> {
    read_tree_into(store, root, offset, &mut ReadBufs::new(&mut [IoSliceMut::new(buf)]))
}

/// [`read_tree`] into the caller's buffers: each run of adjacent blocks is one read of the
/// medium straight into them, however they are scattered.
fn read_tree_into(store: &BlockStore, root: BlockAddr, offset: u64, buf: &mut ReadBufs<'_, '_>) -> Result<()> {
    if buf.len() == 0 {
        return Ok(());
    }
    let list: Vec<Piece> = pieces(offset, buf.len()).collect();
    let (_gate, maps) = gated_lookups(store, root, &list)?;
    let mut i = 0;
    while i < list.len() {
        let j = run_end(&maps, i);
        let (p0, pl) = (list[i], list[j - 1]);
        match maps[i] {
            Mapping::Unmapped => buf.zero(p0.buf..pl.buf + pl.len),
            Mapping::Mapped { addr, .. } => {
                store.read_data_vectored(addr, p0.at, &mut buf.slices(p0.buf..pl.buf + pl.len))?
            }
        }
        i = j;
    }
    Ok(())
}

/// [`read_tree`] only if nothing has to wait for the medium: every tree block it needs is in
/// memory and every data block in the page cache ([`BlockStore::try_read_data_vectored`]).
/// `Ok(None)` otherwise, `buf` then holding anything. On success, the byte extents of the
/// range (holes are the unmapped blocks, read as zeros), as [`tree_extents`] gives them.
fn try_read_tree(store: &BlockStore, root: BlockAddr, offset: u64, buf: &mut [u8]) -> Result<Option<Vec<Extent>>> {
    let list: Vec<Piece> = pieces(offset, buf.len()).collect();
    let Some((_gate, maps)) = store.try_cached_guarded(|meta| lookup_all(meta, root, &list))? else {
        return Ok(None);
    };
    // Race tests pause here: a block found is freed meanwhile, and must not be reused.
    test_point!("vdi::try_read::looked_up");
    let mut extents: Vec<Extent> = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let j = run_end(&maps, i);
        let (p0, pl) = (list[i], list[j - 1]);
        let span = &mut buf[p0.buf..pl.buf + pl.len];
        let kind = match maps[i] {
            Mapping::Unmapped => {
                span.fill(0);
                ExtentKind::Hole
            }
            Mapping::Mapped { addr, .. } => {
                if !store.try_read_data_vectored(addr, p0.at, &mut [IoSliceMut::new(span)])? {
                    return Ok(None);
                }
                ExtentKind::Data
            }
        };
        let (at, len) = (offset + p0.buf as u64, (pl.buf + pl.len - p0.buf) as u64);
        match extents.last_mut() {
            Some(x) if x.kind == kind => x.len += len,
            _ => extents.push(Extent { offset: at, len, kind }),
        }
        i = j;
    }
    Ok(Some(extents))
}

/// Byte extents of `[offset, offset+len)` of the tree at `root`.
pub(crate) fn tree_extents(store: &BlockStore, root: BlockAddr, offset: u64, len: u64) -> Result<Vec<Extent>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let end = offset + len;
    // At most one level-1 node's span (1 GiB, 512 leaves) per turn of the metadata lock: a
    // large request never holds it for a long walk. (Runs that cross a boundary are merged
    // below.)
    const CHUNK: u64 = 512 * 512;
    let (first, last) = (offset / BS, end.div_ceil(BS));
    let mut runs: Vec<radix::Run> = Vec::new();
    let mut at = first;
    while at < last {
        let stop = ((at / CHUNK + 1) * CHUNK).min(last);
        runs.extend(store.with_cached(|meta| radix::mapped_runs(meta, root, at, stop))?);
        at = stop;
    }
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |o: u64, l: u64, kind: ExtentKind| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(x) if x.kind == kind && x.offset + x.len == o => x.len += l,
            _ => out.push(Extent { offset: o, len: l, kind }),
        }
    };
    let mut pos = offset;
    for r in runs {
        let s = (r.start * BS).max(offset);
        let e = ((r.start + r.len) * BS).min(end);
        push(pos, s.saturating_sub(pos), ExtentKind::Hole);
        push(s, e - s, ExtentKind::Data);
        pos = e;
    }
    push(pos, end - pos, ExtentKind::Hole);
    Ok(out)
}

/// Reserves up to `want` consecutive free blocks (at least one) for data about to be written.
/// No count changes until [`map_run`] claims them, so nothing leaks if the write fails or the
/// power goes before the mapping commits.
pub(crate) fn alloc_run(store: &BlockStore, want: u64) -> Result<(BlockAddr, u64)> {
    Ok(store.with_transaction(|txn| txn.reserve_run(want))?)
}

/// Like [`alloc_run`], for blocks to be mapped at `vblock` of the tree at `root`: from the
/// allocation group most of that leaf's data is in when it has `want` free blocks in a row, so
/// copying the leaf after the next snapshot changes few count blocks (docs/design.md,
/// "Placement"). The placement is only a hint: if it cannot be had from memory, the allocator
/// places the blocks as [`alloc_run`] does.
pub(crate) fn alloc_run_for(store: &BlockStore, root: BlockAddr, vblock: u64, want: u64) -> Result<(BlockAddr, u64)> {
    Ok(store.with_transaction(|txn| {
        let group_of = txn.group_of();
        match radix::leaf_home(txn, root, vblock, group_of) {
            Ok(Some(near)) => txn.reserve_run_near(want, near),
            _ => txn.reserve_run(want),
        }
    })?)
}

/// Returns `n` reserved blocks from `first` that will not be mapped.
pub(crate) fn free_run(store: &BlockStore, first: BlockAddr, n: u64) -> Result<()> {
    store.lock().unreserve(first, n);
    Ok(())
}

/// Claims the reserved blocks from `first` and maps virtual blocks `vblocks` to them, in one
/// transaction: all or nothing. If mapping fails, the transaction rolls back only its own
/// changes and the blocks go back to the allocator.
pub(crate) fn map_run(
    store: &BlockStore,
    root: BlockAddr,
    vblocks: impl ExactSizeIterator<Item = u64>,
    first: BlockAddr,
) -> Result<()> {
    let vblocks: Vec<u64> = vblocks.collect();
    let n = vblocks.len() as u64;
    let mapped = store.with_transaction(|txn| {
        for (k, vb) in vblocks.iter().enumerate() {
            let block = BlockAddr(first.0 + k as u64);
            txn.claim(block)?;
            radix::map(txn, root, *vb, block)?;
        }
        Ok(())
    });
    if let Err(e) = mapped {
        free_run(store, first, n)?;
        return Err(e.into());
    }
    Ok(())
}

/// A VDI opened for I/O. Dropping it releases the VDI (and its writer claim).
pub struct VdiDisk {
    reg: Arc<Registry>,
    live: Arc<VdiLive>,
    writable: bool,
    handle: Arc<HandleStats>,
}

/// A snapshot opened for reading. It cannot be deleted while open.
pub struct SnapshotDisk {
    reg: Arc<Registry>,
    id: SnapshotId,
    root: BlockAddr,
    size: u64,
    open: Arc<AtomicUsize>,
    handle: Arc<HandleStats>,
}

impl Registry {
    /// Opens VDI `id` for I/O. At most one writable handle exists per VDI at a time; a second
    /// gets [`VdiError::Busy`]. Read-only handles may be opened alongside.
    pub fn open_vdi(self: &Arc<Self>, id: VdiId, writable: bool) -> Result<VdiDisk> {
        if writable && self.store.lock().is_read_only() {
            return Err(VdiError::Store(blockstore::StoreError::ReadOnly));
        }
        // The open count changes under the registry lock, where delete checks it: a handle can
        // never outlive its VDI.
        let st = self.state.lock();
        let live = st.vdi(id)?.live.clone();
        if writable && live.writer.swap(true, Ordering::AcqRel) {
            return Err(VdiError::Busy(id));
        }
        live.open.fetch_add(1, Ordering::AcqRel);
        drop(st);
        // Race tests pause here: a delete now must find the VDI open.
        test_point!("vdi::open_vdi::counted");
        let handle = self.handles.register(Source::Vdi(id), id, writable);
        Ok(VdiDisk { reg: self.clone(), live, writable, handle })
    }

    /// [`Registry::open_vdi`], but when another writable handle holds the VDI, waits up to
    /// `grace` for it to be dropped (woken by the drop, no polling) before answering
    /// [`VdiError::Busy`]. For a client that reconnects at once after its connection broke:
    /// the server may still be finishing the old connection's requests when the new one asks.
    pub fn open_vdi_within(self: &Arc<Self>, id: VdiId, writable: bool, grace: std::time::Duration) -> Result<VdiDisk> {
        let deadline = std::time::Instant::now() + grace;
        loop {
            match self.open_vdi(id, writable) {
                Err(VdiError::Busy(_)) if std::time::Instant::now() < deadline => {}
                other => return other,
            }
            let live = self.state.lock().vdi(id)?.live.clone();
            let mut g = self.writer_gone.0.lock();
            // Checked under the lock the dropping handle notifies under: no lost wake-up.
            while live.writer.load(Ordering::Acquire) {
                if self.writer_gone.1.wait_until(&mut g, deadline).timed_out() {
                    return Err(VdiError::Busy(id));
                }
            }
        }
    }

    /// Opens snapshot `sid` for reading.
    pub fn open_snapshot(self: &Arc<Self>, sid: SnapshotId) -> Result<SnapshotDisk> {
        let st = self.state.lock();
        let s = st.snap(sid)?;
        s.open.fetch_add(1, Ordering::AcqRel);
        let (root, size, open, vdi) = (s.root, s.size, s.open.clone(), s.vdi);
        drop(st);
        let handle = self.handles.register(Source::Snapshot(sid), vdi, false);
        Ok(SnapshotDisk { reg: self.clone(), id: sid, root, size, open, handle })
    }

    /// Opens a VDI (read-only view) or a snapshot for reading.
    pub fn open_source(self: &Arc<Self>, src: Source) -> Result<Box<dyn BlockDevice>> {
        Ok(match src {
            Source::Vdi(id) => Box::new(self.open_vdi(id, false)?),
            Source::Snapshot(s) => Box::new(self.open_snapshot(s)?),
        })
    }
}

impl Drop for VdiDisk {
    fn drop(&mut self) {
        self.live.open.fetch_sub(1, Ordering::AcqRel);
        if self.writable {
            self.live.writer.store(false, Ordering::Release);
            let _g = self.reg.writer_gone.0.lock();
            self.reg.writer_gone.1.notify_all();
        }
    }
}

impl Drop for SnapshotDisk {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SnapshotDisk {
    /// The snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    /// Says who uses this handle (e.g. `tcp:127.0.0.1:50312`), for `vdi stats` and metrics.
    pub fn set_client(&self, client: &str) {
        self.handle.set_client(client);
    }

    /// What this handle did so far.
    pub fn io_report(&self) -> HandleReport {
        handle_report(&self.handle)
    }

    fn meter<T>(&self, op: IoOp, bytes: usize, f: impl FnOnce() -> DevResult<T>) -> DevResult<T> {
        self.handle.meter(None, op, bytes, f)
    }
}

impl VdiDisk {
    /// The VDI's id.
    pub fn id(&self) -> VdiId {
        self.live.id
    }

    /// Says who uses this handle (e.g. `tcp:127.0.0.1:50312`), for `vdi stats` and metrics.
    pub fn set_client(&self, client: &str) {
        self.handle.set_client(client);
    }

    /// What this handle did so far.
    pub fn io_report(&self) -> HandleReport {
        handle_report(&self.handle)
    }

    /// Runs one operation, counting it for this handle and for the VDI.
    fn meter<T>(&self, op: IoOp, bytes: usize, f: impl FnOnce() -> DevResult<T>) -> DevResult<T> {
        self.handle.meter(Some(&self.live.stats), op, bytes, f)
    }

    fn store(&self) -> &BlockStore {
        &self.reg.store
    }

    fn root(&self) -> BlockAddr {
        BlockAddr(self.live.root.load(Ordering::Acquire))
    }

    fn check_write(&self, offset: u64, len: u64) -> DevResult<()> {
        if !self.writable {
            return Err(DevError::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    /// Writes with the VDI's I/O lock already held (shared or exclusive).
    fn write_locked(&self, offset: u64, data: &WriteBufs<'_, '_>) -> Result<()> {
        let store = self.store();
        let root = self.root();
        let list: Vec<Piece> = pieces(offset, data.len()).collect();
        let (_gate, maps) = gated_lookups(store, root, &list)?;
        let mut shared = Vec::new();
        let mut i = 0;
        while i < list.len() {
            let Mapping::Mapped { addr, writable: true } = maps[i] else {
                shared.push(list[i]);
                i += 1;
                continue;
            };
            // One write for the following pieces that are private and in the following blocks
            // (as a read does): a large write in place is one request to the medium, not one
            // per block — on RADOS each is a round trip to an OSD.
            let mut j = i + 1;
            while j < list.len()
                && matches!(maps[j], Mapping::Mapped { addr: a, writable: true } if a.0 == addr.0 + (j - i) as u64)
            {
                j += 1;
            }
            let (p0, pl) = (list[i], list[j - 1]);
            store.write_data_vectored(addr, p0.at, &data.slices(p0.buf..pl.buf + pl.len))?;
            i = j;
        }
        if !shared.is_empty() {
            let _cow = self.live.cow.lock(shared.iter().map(|p| p.vblock));
            self.write_new_blocks(root, &shared, data)?;
        }
        Ok(())
    }

    /// Writes pieces whose blocks are unmapped or shared: each gets a fresh block, written in
    /// full (merged with the old contents for partial pieces) before the tree points at it.
    fn write_new_blocks(&self, root: BlockAddr, list: &[Piece], data: &WriteBufs<'_, '_>) -> Result<()> {
        let store = self.store();
        // Someone may have made these private while we waited for the lock.
        let maps = lookups(store, root, list)?;
        let mut i = 0;
        while i < list.len() {
            if let Mapping::Mapped { addr, writable: true } = maps[i] {
                let p = list[i];
                store.write_data_vectored(addr, p.at, &data.slices(p.buf..p.buf + p.len))?;
                i += 1;
                continue;
            }
            // A run of consecutive virtual blocks needing new blocks.
            let mut j = i + 1;
            while j < list.len()
                && list[j].vblock == list[j - 1].vblock + 1
                && !matches!(maps[j], Mapping::Mapped { writable: true, .. })
            {
                j += 1;
            }
            let (first, got) = alloc_run_for(store, root, list[i].vblock, (j - i) as u64)?;
            let n = got as usize;
            let mut buf = vec![0u8; n * BLOCK_SIZE];
            for k in 0..n {
                let p = list[i + k];
                let block = &mut buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                if p.len < BLOCK_SIZE
                    && let Mapping::Mapped { addr, .. } = maps[i + k]
                    && let Err(e) = store.read_data(addr, 0, block)
                {
                    free_run(store, first, got)?;
                    return Err(e.into());
                }
                data.copy_to(p.buf, &mut block[p.at..p.at + p.len]);
            }
            if let Err(e) = store.write_data(first, 0, &buf) {
                free_run(store, first, got)?;
                return Err(e.into());
            }
            // Race tests stop a write here: its data is on the medium, its block not yet mapped.
            test_point!("vdi::write::data_written");
            map_run(store, root, list[i..i + n].iter().map(|p| p.vblock), first)?;
            i += n;
        }
        Ok(())
    }

    /// From a quarter of the journal on, asks the background committer (if one runs) for a
    /// commit, and does not wait for it; at half, commits before replying — as every write
    /// did before there was a committer, and the back-pressure that keeps the other half for
    /// transactions already under way.
    fn commit_if_large(&self) -> Result<()> {
        let (soon, now) = {
            let m = self.store().lock();
            (m.commit_soon(), m.should_commit())
        };
        if now {
            self.store().commit()?;
        } else if soon {
            self.reg.committer.request();
        }
        Ok(())
    }

    /// Unmaps whole blocks and zeroes partial edges, with the I/O lock held exclusively.
    fn discard_locked(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let first_whole = offset.div_ceil(BS);
        let end_whole = end / BS;
        if first_whole >= end_whole {
            self.zero_if_mapped(offset, len)?;
            return Ok(());
        }
        self.zero_if_mapped(offset, first_whole * BS - offset)?;
        self.zero_if_mapped(end_whole * BS, end - end_whole * BS)?;
        let root = self.root();
        self.store().with_transaction(|txn| radix::unmap(txn, root, first_whole, end_whole))?;
        Ok(())
    }

    /// Zeroes `[offset, offset+len)` in the blocks that are mapped (unmapped ones read as
    /// zeros already). The range may touch two blocks.
    fn zero_if_mapped(&self, offset: u64, len: u64) -> Result<()> {
        for p in pieces(offset, len as usize) {
            let root = self.root();
            let m = self.store().with_cached(|meta| radix::lookup(meta, root, p.vblock))?;
            if matches!(m, Mapping::Mapped { .. }) {
                let zeros = vec![0u8; p.len];
                self.write_locked(p.vblock * BS + p.at as u64, &WriteBufs::new(&[IoSlice::new(&zeros)]))?;
            }
        }
        Ok(())
    }
}

impl BlockDevice for VdiDisk {
    fn size(&self) -> u64 {
        self.live.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.read_vectored_at(offset, &mut [IoSliceMut::new(buf)])
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let mut buf = ReadBufs::new(bufs);
        let n = buf.len();
        self.meter(IoOp::Read, n, || {
            check_range(offset, n as u64, self.size())?;
            let _io = self.live.io.read();
            Ok(read_tree_into(self.store(), self.root(), offset, &mut buf)?)
        })
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        let n = buf.len();
        let done = self.handle.meter_attempt(Some(&self.live.stats), IoOp::Read, n, || {
            check_range(offset, n as u64, self.size())?;
            // A snapshot or discard holding the VDI quiet: the usual path waits for it.
            let Some(_io) = self.live.io.try_read() else {
                return Ok(None);
            };
            Ok::<_, DevError>(try_read_tree(self.store(), self.root(), offset, buf)?)
        })?;
        Ok(done.map_or(TryRead::WouldWait, TryRead::Done))
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        self.write_vectored_at(offset, &[IoSlice::new(data)], fua)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        let data = WriteBufs::new(bufs);
        self.meter(IoOp::Write, data.len(), || {
            self.check_write(offset, data.len() as u64)?;
            {
                let _io = self.live.io.read();
                self.write_locked(offset, &data)?;
            }
            if fua {
                self.store().commit().map_err(VdiError::from)?;
            } else {
                self.commit_if_large()?;
            }
            Ok(())
        })
    }

    fn writes_land_in_memory(&self) -> bool {
        // A data write is one write to the store's medium, after a lookup (and at times a
        // copy-on-write) in metadata that is almost always cached.
        self.store().backend().buffers_writes()
    }

    fn flush(&self) -> DevResult<()> {
        self.meter(IoOp::Flush, 0, || {
            if !self.writable {
                return Ok(());
            }
            self.store().commit().map_err(VdiError::from)?;
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.meter(IoOp::Discard, 0, || {
            self.check_write(offset, len)?;
            {
                let _io = self.live.io.write();
                self.discard_locked(offset, len)?;
            }
            self.reg.reclaim.wake_if_queued(self.store());
            self.commit_if_large()?;
            Ok(())
        })
    }

    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.size())?;
        let _io = self.live.io.read();
        Ok(tree_extents(self.store(), self.root(), offset, len)?)
    }
}

impl BlockDevice for SnapshotDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.read_vectored_at(offset, &mut [IoSliceMut::new(buf)])
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let mut buf = ReadBufs::new(bufs);
        let n = buf.len();
        self.meter(IoOp::Read, n, || {
            check_range(offset, n as u64, self.size)?;
            Ok(read_tree_into(&self.reg.store, self.root, offset, &mut buf)?)
        })
    }

    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        let n = buf.len();
        let done = self.handle.meter_attempt(None, IoOp::Read, n, || {
            check_range(offset, n as u64, self.size)?;
            Ok::<_, DevError>(try_read_tree(&self.reg.store, self.root, offset, buf)?)
        })?;
        Ok(done.map_or(TryRead::WouldWait, TryRead::Done))
    }

    fn write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> DevResult<()> {
        Err(DevError::ReadOnly)
    }

    fn flush(&self) -> DevResult<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> DevResult<()> {
        Err(DevError::ReadOnly)
    }

    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(tree_extents(&self.reg.store, self.root, offset, len)?)
    }
}

/// Makes bytes `[from, to)` of VDI `live` — past its size, inside the block that straddles
/// its end — read as zeros, by writing that block anew (the old block's reference is
/// dropped). For growing a VDI whose size is not a whole number of blocks; the caller holds
/// the VDI's writer claim and its I/O lock.
pub(crate) fn zero_beyond_size(store: &BlockStore, live: &VdiLive, from: u64, to: u64) -> Result<()> {
    let vblock = from / BS;
    assert!(from <= to && to <= (vblock + 1) * BS, "inside one block");
    let root = BlockAddr(live.root.load(Ordering::Acquire));
    let whole = Piece { vblock, at: 0, buf: 0, len: BLOCK_SIZE };
    if matches!(lookups(store, root, &[whole])?[0], Mapping::Unmapped) {
        return Ok(());
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    read_tree(store, root, vblock * BS, &mut block)?;
    block[(from - vblock * BS) as usize..(to - vblock * BS) as usize].fill(0);
    store_new_blocks(store, root, vblock, &block).map(|_| ())
}

/// Writes `data` (whole blocks) into newly allocated blocks and maps them at virtual blocks
/// `first..` of the tree at `root`, in as few runs as the allocator gives; each old mapping's
/// reference is dropped. A block is mapped only after its data is written. Returns the blocks
/// written.
pub(crate) fn store_new_blocks(store: &BlockStore, root: BlockAddr, first: u64, data: &[u8]) -> Result<u64> {
    assert!(data.len().is_multiple_of(BLOCK_SIZE), "whole blocks only");
    let blocks = data.len() / BLOCK_SIZE;
    let mut i = 0;
    while i < blocks {
        let (addr, got) = alloc_run(store, (blocks - i) as u64)?;
        let got = got as usize;
        if let Err(e) = store.write_data(addr, 0, &data[i * BLOCK_SIZE..(i + got) * BLOCK_SIZE]) {
            free_run(store, addr, got as u64)?;
            return Err(e.into());
        }
        map_run(store, root, (0..got).map(|j| first + (i + j) as u64), addr)?;
        i += got;
    }
    Ok(blocks as u64)
}
