//! Filling a VDI from an image: the [`Import`] transaction, which builds the VDI's new contents
//! as a private copy of its tree and swaps it in at the end, changing only blocks whose contents
//! differ; the raw-image reader on top of it; and [`ImportDevice`], through which an external
//! converter (`qemu-img convert` over NBD) writes into an import.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockdev::{BlockDevice, DevError, DevResult, Extent, check_range};
use blockstore::{BLOCK_SIZE, BlockAddr};
use parking_lot::Mutex;

use crate::import::{CHUNK, ImportStats, file_err, image_size, next_data, read_full};
use crate::registry::{Registry, VdiLive, write_record};
use crate::{Result, VdiError, VdiId};

const BS: u64 = BLOCK_SIZE as u64;
static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// An import into one VDI, in progress. The VDI's tree is forked: the import writes into a
/// private copy that shares every block with the VDI until a block's contents actually change,
/// so a re-fill with the same image changes nothing and a clone filled with an image close to
/// its parent's keeps sharing the rest. [`Import::commit`] swaps the copy in atomically;
/// dropping the import (an error, a full store) or a crash leaves the VDI as it was.
///
/// While it lives, the import holds the VDI's writer claim (no export can write to it) and an
/// open handle (it cannot be deleted).
pub struct Import {
    reg: Arc<Registry>,
    live: Arc<VdiLive>,
    /// Root of the private copy, recorded in the VDI's record as its pending tree.
    tree: BlockAddr,
    /// The VDI's size when the import began (0: not set yet).
    vdi_size: u64,
    stats: ImportStats,
    finished: bool,
}

impl Registry {
    /// Starts an import into VDI `id` (see [`Import`]). Fails with [`VdiError::Busy`] if an
    /// export or another import has the VDI open for writing.
    pub fn begin_import(self: &Arc<Self>, id: VdiId) -> Result<Import> {
        let live = {
            let st = self.state.lock();
            let live = st.vdi(id)?.live.clone();
            if live.writer.swap(true, Ordering::AcqRel) {
                return Err(VdiError::Busy(id));
            }
            live.open.fetch_add(1, Ordering::AcqRel);
            live
        };
        let mut import = Import {
            reg: self.clone(),
            vdi_size: live.size.load(Ordering::Acquire),
            live,
            tree: BlockAddr::NONE,
            stats: ImportStats::default(),
            finished: false,
        };
        // Fork the VDI's tree twice — one copy for the import, one to stay the VDI's tree —
        // and drop the original. Both copies share every child with no writable bit set, so
        // neither can write a block in place that the other still maps.
        let live = import.live.clone();
        let quiet = live.io.write();
        import.tree = self.transact(|st, meta| {
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            if !v.pending_root.is_none() {
                // An earlier import whose cleanup failed: its tree goes now.
                radix::defer_release(meta, v.pending_root)?;
            }
            let original = BlockAddr(v.live.root.load(Ordering::Acquire));
            let private = radix::fork(meta, original)?;
            let kept = radix::fork(meta, original)?;
            v.live.root.store(kept.0, Ordering::Release);
            v.pending_root = private;
            write_record(meta, id, v)?;
            radix::defer_release(meta, original)?;
            Ok(private)
        })?;
        drop(quiet);
        Ok(import)
    }
}

impl Registry {
    /// Refuses an image of `size` bytes that VDI `id` cannot hold (one with a size set
    /// must be at least as large), before an import begins.
    pub fn check_image_fits(&self, id: VdiId, size: u64) -> Result<()> {
        let vdi_size = self.size_of(crate::Source::Vdi(id))?;
        if size > crate::MAX_VDI_SIZE {
            return Err(VdiError::BadSize(size));
        }
        if vdi_size != 0 && size > vdi_size {
            return Err(VdiError::ImageTooLarge { vdi: id, size: vdi_size, image: size });
        }
        Ok(())
    }

    /// [`Registry::begin_import`] for contents of `size` bytes, which the VDI takes at
    /// commit whatever its size was: past a smaller new size everything is dropped, and
    /// growing past a size that ends inside a block zeroes the rest of that block.
    pub fn begin_import_resized(self: &Arc<Self>, id: VdiId, size: u64) -> Result<Import> {
        if size == 0 || !size.is_multiple_of(512) || size > crate::MAX_VDI_SIZE {
            return Err(VdiError::BadSize(size));
        }
        let mut import = self.begin_import(id)?;
        let old = import.vdi_size;
        if old != 0 && size < old {
            import.write_zeroes(size, old - size)?;
        }
        import.vdi_size = size;
        if old != 0 && size > old && !old.is_multiple_of(BS) {
            import.write_zeroes(old, size.min(old.div_ceil(BS) * BS) - old)?;
        }
        Ok(import)
    }
}

impl Import {
    /// The VDI's size when the import began; 0 if it has none yet (the image will set it).
    pub fn vdi_size(&self) -> u64 {
        self.vdi_size
    }

    /// What the import has done so far.
    pub fn stats(&self) -> ImportStats {
        self.stats
    }

    /// The VDI being filled.
    pub fn vdi(&self) -> VdiId {
        self.live.id
    }

    /// Refuses writes that end past the VDI. Writes go in whole blocks, so a VDI whose size
    /// ends inside a block may be written to that block's end (its bytes past the size are
    /// never shown); whether the image itself fits is checked on its real size.
    fn check_fits(&self, end: u64) -> Result<()> {
        if end > crate::MAX_VDI_SIZE.div_ceil(BS) * BS {
            return Err(VdiError::BadSize(end));
        }
        if self.vdi_size != 0 && end > self.vdi_size.div_ceil(BS) * BS {
            return Err(VdiError::ImageTooLarge { vdi: self.live.id, size: self.vdi_size, image: end });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the import's tree (what the VDI will hold).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::io::read_tree(&self.reg.store, self.tree, offset, buf)
    }

    /// Makes whole blocks from `offset` (a multiple of 4096) hold `data` (a multiple of 4096
    /// bytes long). Blocks that already hold the same bytes are left alone, all-zero blocks are
    /// unmapped, the rest are stored.
    pub fn write_blocks(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        assert!(offset.is_multiple_of(BS) && data.len().is_multiple_of(BLOCK_SIZE), "whole blocks only");
        self.check_fits(offset + data.len() as u64)?;
        let mut current = vec![0u8; data.len()];
        self.read(offset, &mut current)?;
        let first = offset / BS;
        let new: Vec<&[u8]> = data.chunks_exact(BLOCK_SIZE).collect();
        let old: Vec<&[u8]> = current.chunks_exact(BLOCK_SIZE).collect();
        let mut i = 0;
        while i < new.len() {
            if new[i] == old[i] {
                if new[i] == ZERO_BLOCK.as_slice() {
                    self.stats.zero_blocks += 1;
                } else {
                    self.stats.blocks_unchanged += 1;
                }
                i += 1;
                continue;
            }
            let zero = new[i] == ZERO_BLOCK.as_slice();
            let mut end = i + 1;
            while end < new.len() && new[end] != old[end] && (new[end] == ZERO_BLOCK.as_slice()) == zero {
                end += 1;
            }
            if zero {
                let (s, e) = (first + i as u64, first + end as u64);
                self.reg.store.with_transaction(|txn| radix::unmap(txn, self.tree, s, e))?;
                self.stats.blocks_cleared += (end - i) as u64;
                self.stats.zero_blocks += (end - i) as u64;
            } else {
                self.store_run(first + i as u64, &data[i * BLOCK_SIZE..end * BLOCK_SIZE])?;
            }
            i = end;
        }
        self.commit_if_due()
    }

    /// Stores `data` (whole blocks, all differing from what the tree maps) from virtual block
    /// `first`, in as few allocation runs as the allocator gives.
    fn store_run(&mut self, first: u64, data: &[u8]) -> Result<()> {
        self.stats.blocks_written += crate::io::store_new_blocks(&self.reg.store, self.tree, first, data)?;
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros. Only blocks the tree maps are looked at:
    /// those holding anything but zeros are unmapped, so a range that is already zero changes
    /// nothing.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or(VdiError::BadSize(u64::MAX))?;
        self.check_fits(end)?;
        let (head, tail) = (offset.div_ceil(BS) * BS, end / BS * BS);
        if head >= tail {
            return self.write_bytes(offset, &vec![0u8; len as usize]);
        }
        self.write_bytes(offset, &vec![0u8; (head - offset) as usize])?;
        self.write_bytes(tail, &vec![0u8; (end - tail) as usize])?;
        // A level-1 node's span (1 GiB) per step bounds each transaction and each read.
        const STEP: u64 = 512 * 512;
        let mut at = head / BS;
        while at < tail / BS {
            let stop = ((at / STEP + 1) * STEP).min(tail / BS);
            let runs = self.reg.store.with_cached(|meta| radix::mapped_runs(meta, self.tree, at, stop))?;
            for run in runs {
                let mut b = run.start;
                while b < run.start + run.len {
                    let n = (run.start + run.len - b).min((CHUNK / BLOCK_SIZE) as u64);
                    let zeros = vec![0u8; n as usize * BLOCK_SIZE];
                    self.write_blocks(b * BS, &zeros)?;
                    b += n;
                }
            }
            at = stop;
        }
        Ok(())
    }

    /// Writes `data` at any `offset`; partial blocks at the edges are merged with what the
    /// tree holds.
    pub fn write_bytes(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BS * BS, end.div_ceil(BS) * BS);
        if first == offset && last == end {
            return self.write_blocks(offset, data);
        }
        let mut buf = vec![0u8; (last - first) as usize];
        self.read(first, &mut buf)?;
        buf[(offset - first) as usize..(end - first) as usize].copy_from_slice(data);
        self.write_blocks(first, &buf)
    }

    fn commit_if_due(&self) -> Result<()> {
        if self.reg.store.lock().should_commit() {
            self.reg.store.commit()?;
        }
        Ok(())
    }

    /// Swaps the imported tree in as the VDI's contents, with size `size` (a positive multiple
    /// of 512; the VDI's own size if it had one, which must then be at least as large).
    /// Everything past the image's end must already read as zeros (see
    /// [`Import::write_zeroes`]).
    pub fn commit(self, size: u64) -> Result<ImportStats> {
        self.commit_and_snapshot(size, None).map(|(stats, _)| stats)
    }

    /// [`Import::commit`] and, in the same transaction (so nothing can write between them),
    /// a snapshot of the result named `name`, if given (checked before anything changes).
    pub fn commit_and_snapshot(
        mut self,
        size: u64,
        name: Option<&str>,
    ) -> Result<(ImportStats, Option<crate::SnapshotId>)> {
        if let Some(n) = name {
            crate::snap_names::check_snapshot_name(n)?;
        }
        if size == 0 || !size.is_multiple_of(512) || size > crate::MAX_VDI_SIZE {
            return Err(VdiError::BadSize(size));
        }
        if self.vdi_size != 0 && size != self.vdi_size {
            return Err(VdiError::ImageTooLarge { vdi: self.live.id, size: self.vdi_size, image: size });
        }
        let id = self.live.id;
        let tree = self.tree;
        let _quiet = self.live.io.write();
        let snapshot = self.reg.transact(|st, meta| {
            if let Some(n) = name
                && let Some(other) = st.snapshot_named(id, n)
            {
                return Err(VdiError::SnapshotNameTaken { vdi: id, name: n.to_string(), other });
            }
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            let old = BlockAddr(v.live.root.swap(tree.0, Ordering::AcqRel));
            v.live.size.store(size, Ordering::Release);
            v.pending_root = BlockAddr::NONE;
            write_record(meta, id, v)?;
            radix::defer_release(meta, old)?;
            match name {
                None => Ok(None),
                Some(n) => {
                    let sid = crate::snapshot_ids::hand_out_committed(st, meta)?;
                    crate::registry::take_snapshot(st, meta, sid, id, false)?;
                    st.snaps.get_mut(&sid).ok_or_else(|| VdiError::Damaged("new snapshot vanished".into()))?.name =
                        Some(n.to_string());
                    crate::snap_names::rewrite(st, meta, id)?;
                    Ok(Some(sid))
                }
            }
        })?;
        self.finished = true;
        Ok((self.stats, snapshot))
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if !self.finished && !self.tree.is_none() {
            // Drop everything the import wrote; the VDI keeps its tree.
            let id = self.live.id;
            let cleanup = self.reg.transact(|st, meta| {
                let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
                if !v.pending_root.is_none() {
                    radix::defer_release(meta, v.pending_root)?;
                    v.pending_root = BlockAddr::NONE;
                    write_record(meta, id, v)?;
                }
                Ok(())
            });
            if let Err(c) = cleanup {
                tracing::error!("could not drop the failed import of VDI {id}: {c}; it is dropped at next open");
            }
        }
        self.live.open.fetch_sub(1, Ordering::AcqRel);
        self.live.writer.store(false, Ordering::Release);
        let _g = self.reg.writer_gone.0.lock();
        self.reg.writer_gone.1.notify_all();
    }
}

/// Where a raw image comes from.
enum RawInput<'a> {
    /// A file or block device: read at offsets, holes skipped.
    Seekable { f: &'a File, size: u64 },
    /// A pipe, socket or any reader: read in order to the end.
    Stream(&'a mut (dyn Read + Send)),
}

impl Registry {
    /// Makes VDI `id` equal to the raw image at `path`, byte for byte (see [`Import`]). A VDI
    /// without a size takes the image's (rounded up to 512 bytes); one with a size must be at
    /// least as large, and what lies past the image reads as zeros afterwards.
    /// `progress(done, total)` is called as bytes are processed.
    pub fn fill(self: &Arc<Self>, id: VdiId, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<ImportStats> {
        let f = File::open(path).map_err(file_err(format!("opening {}", path.display())))?;
        self.fill_from(id, &f, &path.display().to_string(), progress)
    }

    /// [`Registry::fill`] from an open file: a regular file or block device is read at offsets
    /// (its holes skipped), anything else (a pipe, standard input) in order to its end.
    /// `name` says what `f` is, for errors.
    pub fn fill_from(
        self: &Arc<Self>,
        id: VdiId,
        f: &File,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ImportStats> {
        let meta = f.metadata().map_err(file_err(format!("examining {name}")))?;
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_file() || ft.is_block_device() {
            let size = image_size(f, Path::new(name))?;
            self.fill_raw_input(id, RawInput::Seekable { f, size }, name, progress)
        } else {
            let mut reader = f;
            self.fill_raw_input(id, RawInput::Stream(&mut reader), name, progress)
        }
    }

    /// [`Registry::fill`] from a stream (standard input, a pipe, a decompressor), read in order
    /// to its end.
    pub fn fill_stream(
        self: &Arc<Self>,
        id: VdiId,
        reader: &mut (dyn Read + Send),
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ImportStats> {
        self.fill_raw_input(id, RawInput::Stream(reader), name, progress)
    }

    fn fill_raw_input(
        self: &Arc<Self>,
        id: VdiId,
        input: RawInput<'_>,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ImportStats> {
        // Refuse an image that cannot fit before anything is written (a stream's size is
        // known only at its end).
        if let RawInput::Seekable { size, .. } = input {
            self.check_image_fits(id, size)?;
        }
        let mut import = self.begin_import(id)?;
        let image_bytes = fill_raw(&mut import, input, name, progress)?;
        // A stream's size is known only now.
        if import.vdi_size() != 0 && image_bytes > import.vdi_size() {
            return Err(VdiError::ImageTooLarge { vdi: id, size: import.vdi_size(), image: image_bytes });
        }
        let size = if import.vdi_size() == 0 { image_bytes.div_ceil(512) * 512 } else { import.vdi_size() };
        if size == 0 {
            return Err(VdiError::BadSize(0));
        }
        // What the image does not cover reads as zeros.
        let covered = image_bytes.div_ceil(BS) * BS;
        if size > covered {
            import.write_zeroes(covered, size - covered)?;
        }
        import.stats.image_bytes = image_bytes;
        import.commit(size)
    }
}

/// Copies a raw image into `import`; returns the image's size in bytes.
fn fill_raw(import: &mut Import, input: RawInput<'_>, name: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
    let (full_tx, full_rx) = crossbeam_channel::bounded::<std::io::Result<Piece>>(1);
    let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(READ_AHEAD);
    for _ in 0..READ_AHEAD {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    let total = match input {
        RawInput::Seekable { size, .. } => size,
        RawInput::Stream(_) => 0,
    };
    // A reader thread fills buffers while this thread stores the previous one. Two buffers in
    // flight bound the memory.
    std::thread::scope(|scope| -> Result<u64> {
        scope.spawn(move || match input {
            RawInput::Seekable { f, size } => read_seekable(f, size, &empty_rx, &full_tx),
            RawInput::Stream(f) => read_stream(f, &empty_rx, &full_tx),
        });
        let result = (|| -> Result<u64> {
            let mut pos = 0u64;
            let mut image_end = 0u64;
            for piece in full_rx.iter() {
                let piece = piece.map_err(file_err(format!("reading {name}")))?;
                match piece {
                    Piece::Data { at, read, buf } => {
                        // Whatever lay between the last piece and this one is a hole.
                        if at > pos {
                            import.stats.hole_bytes += at - pos;
                            import.write_zeroes(pos, at - pos)?;
                        }
                        import.stats.bytes_read += read as u64;
                        let blocks = read.div_ceil(BLOCK_SIZE);
                        import.write_blocks(at, &buf[..blocks * BLOCK_SIZE])?;
                        pos = at + (blocks * BLOCK_SIZE) as u64;
                        image_end = at + read as u64;
                        let _ = empty_tx.send(buf);
                    }
                    Piece::End { size } => image_end = size,
                }
                progress(pos.min(image_end.max(total)), total.max(image_end));
            }
            // A hole at the end of a file.
            let covered = image_end.div_ceil(BS) * BS;
            if covered > pos {
                import.stats.hole_bytes += covered - pos;
                import.write_zeroes(pos, covered - pos)?;
            }
            Ok(image_end)
        })();
        // Stop the reader early on an error: it ends when the channels close.
        drop(empty_tx);
        drop(full_rx);
        result
    })
}

/// What the reader thread hands over.
enum Piece {
    /// Bytes of the image at `at` (a multiple of 4096); `read` of them are the image's, the
    /// buffer is zero-padded to whole blocks.
    Data { at: u64, read: usize, buf: Vec<u8> },
    /// The image ends at `size` bytes.
    End { size: u64 },
}

/// Buffers of `CHUNK` bytes circulating between the reader thread and the importer.
const READ_AHEAD: usize = 2;

/// Reads the data regions of a seekable image (holes skipped with SEEK_DATA/SEEK_HOLE) in order.
fn read_seekable(
    f: &File,
    size: u64,
    empty: &crossbeam_channel::Receiver<Vec<u8>>,
    full: &crossbeam_channel::Sender<std::io::Result<Piece>>,
) {
    let end = size.div_ceil(BS) * BS;
    let mut pos = 0u64;
    while pos < size {
        let Some((ds, de)) = next_data(f, pos, size) else { break };
        // Work in whole blocks: round the region out to 4 KiB.
        let (ds, de) = (ds / BS * BS, de.div_ceil(BS) * BS);
        let mut at = ds.max(pos);
        while at < de.min(end) {
            let Ok(mut buf) = empty.recv() else { return };
            let want = ((de.min(end) - at) as usize).min(CHUNK);
            let n = match read_full(f, at, &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = full.send(Err(e));
                    return;
                }
            };
            let blocks = n.div_ceil(BLOCK_SIZE);
            buf[n..blocks * BLOCK_SIZE].fill(0);
            if full.send(Ok(Piece::Data { at, read: n, buf })).is_err() {
                return;
            }
            at += (blocks * BLOCK_SIZE) as u64;
        }
        pos = at.max(de);
    }
    let _ = full.send(Ok(Piece::End { size }));
}

/// Reads a stream to its end, in order.
fn read_stream(
    f: &mut (dyn Read + Send),
    empty: &crossbeam_channel::Receiver<Vec<u8>>,
    full: &crossbeam_channel::Sender<std::io::Result<Piece>>,
) {
    let mut at = 0u64;
    loop {
        let Ok(mut buf) = empty.recv() else { return };
        let mut n = 0;
        while n < CHUNK {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = full.send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            let _ = full.send(Ok(Piece::End { size: at }));
            return;
        }
        let blocks = n.div_ceil(BLOCK_SIZE);
        buf[n..blocks * BLOCK_SIZE].fill(0);
        let last = n < CHUNK;
        if full.send(Ok(Piece::Data { at, read: n, buf })).is_err() {
            return;
        }
        at += n as u64;
        if last {
            let _ = full.send(Ok(Piece::End { size: at }));
            return;
        }
    }
}

/// An [`Import`] as a block device of a given size, for a converter that writes the image
/// (`qemu-img convert` into an NBD export of it). Reads show what the VDI will hold; writes,
/// zeroes and discards go into the import; nothing reaches the VDI until [`ImportDevice::finish`].
pub struct ImportDevice {
    import: Mutex<Option<Import>>,
    size: u64,
}

impl ImportDevice {
    /// Wraps `import` as a device of `size` bytes (the image's virtual size).
    pub fn new(import: Import, size: u64) -> Result<ImportDevice> {
        import.check_fits(size)?;
        Ok(ImportDevice { import: Mutex::new(Some(import)), size })
    }

    /// Ends the import: everything past the image reads as zeros and the VDI takes the
    /// imported contents (see [`Import::commit`]). The size is the VDI's own if it had one,
    /// else the image's rounded up to 512 bytes.
    pub fn finish(&self) -> Result<ImportStats> {
        let mut import =
            self.import.lock().take().ok_or_else(|| VdiError::Damaged("import already finished".into()))?;
        let size = if import.vdi_size() == 0 { self.size.div_ceil(512) * 512 } else { import.vdi_size() };
        // The converter wrote the image's bytes and no further: the rest of the VDI, from
        // the image's exact end, reads as zeros.
        if size > self.size {
            import.write_zeroes(self.size, size - self.size)?;
        }
        import.stats.image_bytes = self.size;
        import.commit(size)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Import) -> Result<T>) -> DevResult<T> {
        let mut g = self.import.lock();
        let import = g.as_mut().ok_or_else(|| DevError::Io("the import has ended".into()))?;
        Ok(f(import)?)
    }
}

impl BlockDevice for ImportDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.with(|i| i.read(offset, buf))
    }

    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> DevResult<()> {
        check_range(offset, data.len() as u64, self.size)?;
        self.with(|i| i.write_bytes(offset, data))
    }

    fn flush(&self) -> DevResult<()> {
        // Nothing is the VDI's before the import finishes; its commit makes it durable.
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.size)?;
        self.with(|i| {
            // What the converter says is zeros, it did not send: the image's holes.
            i.stats.hole_bytes += len;
            i.write_zeroes(offset, len)
        })
    }

    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        self.with(|i| crate::io::tree_extents(&i.reg.store, i.tree, offset, len))
    }
}
