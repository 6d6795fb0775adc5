//! Import from raw images or devices, export to them, and comparison.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockstore::{BLOCK_SIZE, BlockAddr};

use crate::registry::{Registry, Source, write_record};
use crate::{Result, VdiError, VdiId};

const CHUNK: usize = 4 << 20;
static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
const BS: u64 = BLOCK_SIZE as u64;

/// What an import did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ImportStats {
    /// Size of the image in bytes.
    pub image_bytes: u64,
    /// Bytes read from the image (holes are not read).
    pub bytes_read: u64,
    /// 4 KiB blocks stored.
    pub blocks_written: u64,
    /// All-zero blocks that were read and not stored.
    pub zero_blocks: u64,
    /// Bytes skipped as holes without reading.
    pub hole_bytes: u64,
}

/// What an export did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ExportStats {
    /// Size of the exported image.
    pub bytes: u64,
    /// Bytes of data written (the rest is holes).
    pub data_bytes: u64,
}

/// The outcome of comparing a VDI or snapshot with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    /// First byte offset where they differ, or `None` if identical. Where one is longer, the
    /// extra part must read as zeros to count as identical.
    pub first_difference: Option<u64>,
    /// Size of the VDI or snapshot.
    pub source_size: u64,
    /// Size of the image.
    pub image_size: u64,
}

fn file_err(op: String) -> impl FnOnce(std::io::Error) -> VdiError {
    move |source| VdiError::File { op, source }
}

/// Size of a regular file or block device.
pub fn image_size(f: &File, path: &Path) -> Result<u64> {
    let mut f = f;
    f.seek(SeekFrom::End(0)).map_err(file_err(format!("finding the size of {}", path.display())))
}

/// The next data region at or after `pos`: `(start, end)`, or `None` past the last one.
fn next_data(f: &File, pos: u64, size: u64) -> Option<(u64, u64)> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own with plain integer arguments; errors are checked.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: no data after pos. Anything else (e.g. a device or pipe): treat all as data.
        return if err.raw_os_error() == Some(libc::ENXIO) { None } else { Some((pos, size)) };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    Some((start as u64, end))
}

/// Holds one count of a VDI's open handles for as long as it lives.
struct OpenCount<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for OpenCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// Makes VDI `id` equal to the image at `path`, byte for byte. Holes and all-zero blocks
    /// are not stored. The import is atomic: it is built as a separate tree and swapped in at
    /// the end; a failure (a full store, say) or a crash leaves the VDI as it was.
    /// `progress(done, total)` is called as bytes are processed.
    pub fn fill(self: &Arc<Self>, id: VdiId, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<ImportStats> {
        let f = File::open(path).map_err(file_err(format!("opening {}", path.display())))?;
        let size = image_size(&f, path)?;
        // The import counts as an open handle, taken under the registry lock, so the VDI
        // cannot be deleted (its pending tree released) while the import writes into it.
        let live = {
            let st = self.state.lock();
            let live = st.vdi(id)?.live.clone();
            if live.open.load(Ordering::Acquire) > 0 {
                return Err(VdiError::InUse(format!("VDI {id}")));
            }
            live.open.fetch_add(1, Ordering::AcqRel);
            live
        };
        let _busy = OpenCount(&live.open);
        let _quiet = live.io.write();
        let vdi_size = live.size.load(Ordering::Acquire);
        let new_size = if vdi_size == 0 { size.div_ceil(512) * 512 } else { vdi_size };
        if new_size == 0 {
            return Err(VdiError::BadSize(0));
        }
        if size > new_size {
            return Err(VdiError::ImageTooLarge { vdi: id, size: vdi_size, image: size });
        }
        if new_size > crate::MAX_VDI_SIZE {
            return Err(VdiError::BadSize(new_size));
        }
        // Start the new tree and record it as pending, so a crash cannot leak it.
        let tree = self.transact(|st, meta| {
            let t = radix::create(meta)?;
            let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
            if !v.pending_root.is_none() {
                // An earlier import whose cleanup failed: its tree goes now.
                radix::defer_release(meta, v.pending_root)?;
            }
            v.pending_root = t;
            write_record(meta, id, v)?;
            Ok(t)
        })?;
        let mut stats = ImportStats { image_bytes: size, ..Default::default() };
        let swapped = self.import_into(&f, path, size, tree, &mut stats, progress).and_then(|()| {
            self.transact(|st, meta| {
                let v = st.vdis.get_mut(&id).ok_or_else(|| VdiError::UnknownVdi(id.to_string()))?;
                let old = BlockAddr(v.live.root.swap(tree.0, Ordering::AcqRel));
                v.live.size.store(new_size, Ordering::Release);
                v.pending_root = BlockAddr::NONE;
                write_record(meta, id, v)?;
                radix::defer_release(meta, old)?;
                Ok(())
            })
        });
        match swapped {
            Ok(()) => Ok(stats),
            Err(e) => {
                // Drop everything the import wrote; the VDI keeps its old tree.
                let cleanup = self.transact(|st, meta| {
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
                Err(e)
            }
        }
    }

    fn import_into(
        &self,
        f: &File,
        path: &Path,
        size: u64,
        tree: BlockAddr,
        stats: &mut ImportStats,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let store = &self.store;
        // A reader thread fills buffers while this thread stores the previous one: reading
        // the image and writing the store overlap. Two buffers in flight bound the memory.
        let (full_tx, full_rx) = crossbeam_channel::bounded::<std::io::Result<Chunk>>(1);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(READ_AHEAD);
        for _ in 0..READ_AHEAD {
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        let mut covered = 0u64;
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || read_chunks(f, size, &empty_rx, &full_tx));
            let result = (|| -> Result<()> {
                for chunk in full_rx.iter() {
                    let chunk = chunk.map_err(file_err(format!("reading {}", path.display())))?;
                    stats.bytes_read += chunk.read as u64;
                    let blocks = chunk.read.div_ceil(BLOCK_SIZE);
                    covered += (blocks * BLOCK_SIZE) as u64;
                    self.store_chunk(tree, chunk.at / BS, &chunk.buf[..blocks * BLOCK_SIZE], stats)?;
                    progress((chunk.at + (blocks * BLOCK_SIZE) as u64).min(size), size);
                    let _ = empty_tx.send(chunk.buf);
                    if store.lock().should_commit() {
                        store.commit()?;
                    }
                }
                Ok(())
            })();
            // Stop the reader early on an error: it ends when the channels close.
            drop(empty_tx);
            drop(full_rx);
            result
        })?;
        // Everything not read was skipped as a hole.
        stats.hole_bytes = (size.div_ceil(BS) * BS).saturating_sub(covered);
        progress(size, size);
        Ok(())
    }

    /// Stores the non-zero blocks of `chunk` (starting at virtual block `first`) in `tree`.
    /// Each run of consecutive non-zero blocks is written straight from `chunk`, one call per
    /// run of consecutive new blocks.
    fn store_chunk(&self, tree: BlockAddr, first: u64, chunk: &[u8], stats: &mut ImportStats) -> Result<()> {
        let store = &self.store;
        let blocks: Vec<&[u8]> = chunk.chunks_exact(BLOCK_SIZE).collect();
        let mut i = 0;
        while i < blocks.len() {
            if blocks[i] == ZERO_BLOCK.as_slice() {
                stats.zero_blocks += 1;
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < blocks.len() && blocks[end] != ZERO_BLOCK.as_slice() {
                end += 1;
            }
            // Blocks i..end are data: allocate and write them in as few runs as possible.
            while i < end {
                let (addr, got) = crate::io::alloc_run(store, (end - i) as u64)?;
                let got = got as usize;
                if let Err(e) = store.write_data(addr, 0, &chunk[i * BLOCK_SIZE..(i + got) * BLOCK_SIZE]) {
                    crate::io::free_run(store, addr, got as u64)?;
                    return Err(e.into());
                }
                crate::io::map_run(store, tree, (0..got).map(|j| first + (i + j) as u64), addr)?;
                stats.blocks_written += got as u64;
                i += got;
            }
        }
        Ok(())
    }

    /// Writes a VDI or snapshot into `out` as a raw image. A regular file is written sparsely
    /// (holes and zero blocks are skipped and the file is truncated to size); anything else
    /// (a pipe, a device) gets every byte.
    pub fn export(
        self: &Arc<Self>,
        src: Source,
        out: &mut File,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportStats> {
        let dev = self.open_source(src)?;
        let size = dev.size();
        let seekable = out.metadata().map(|m| m.is_file()).unwrap_or(false);
        let mut stats = ExportStats { bytes: size, data_bytes: 0 };
        let werr = || file_err("writing the export".to_string());
        if seekable {
            out.set_len(0).map_err(werr())?;
            out.set_len(size).map_err(werr())?;
        }
        let extents = dev.extents(0, size).map_err(|e| VdiError::Damaged(e.to_string()))?;
        let mut buf = vec![0u8; CHUNK];
        let zeros = vec![0u8; CHUNK];
        for ext in extents {
            let mut at = ext.offset;
            let end = ext.offset + ext.len;
            while at < end {
                let n = ((end - at) as usize).min(CHUNK);
                if ext.kind == blockdev::ExtentKind::Hole {
                    if !seekable {
                        out.write_all(&zeros[..n]).map_err(werr())?;
                    }
                } else {
                    dev.read_at(at, &mut buf[..n]).map_err(|e| VdiError::Damaged(e.to_string()))?;
                    if seekable {
                        // Skip zero blocks to keep the file sparse.
                        for (i, b) in buf[..n].chunks(BLOCK_SIZE).enumerate() {
                            if b.iter().any(|&x| x != 0) {
                                out.write_all_at(b, at + (i * BLOCK_SIZE) as u64).map_err(werr())?;
                                stats.data_bytes += b.len() as u64;
                            }
                        }
                    } else {
                        out.write_all(&buf[..n]).map_err(werr())?;
                        stats.data_bytes += n as u64;
                    }
                }
                at += n as u64;
                progress(at, size);
            }
        }
        out.flush().map_err(werr())?;
        Ok(stats)
    }

    /// Compares a VDI or snapshot with the image at `path`.
    pub fn compare(self: &Arc<Self>, src: Source, path: &Path) -> Result<Comparison> {
        let dev = self.open_source(src)?;
        let f = File::open(path).map_err(file_err(format!("opening {}", path.display())))?;
        let image_size = image_size(&f, path)?;
        let source_size = dev.size();
        let total = source_size.max(image_size);
        let mut a = vec![0u8; CHUNK];
        let mut b = vec![0u8; CHUNK];
        let mut at = 0u64;
        while at < total {
            let n = ((total - at) as usize).min(CHUNK);
            a[..n].fill(0);
            b[..n].fill(0);
            if at < source_size {
                let m = ((source_size - at) as usize).min(n);
                dev.read_at(at, &mut a[..m]).map_err(|e| VdiError::Damaged(e.to_string()))?;
            }
            if at < image_size {
                let m = ((image_size - at) as usize).min(n);
                read_full(&f, at, &mut b[..m]).map_err(file_err(format!("reading {}", path.display())))?;
            }
            if a[..n] != b[..n] {
                let i = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap_or(0);
                return Ok(Comparison { first_difference: Some(at + i as u64), source_size, image_size });
            }
            at += n as u64;
        }
        Ok(Comparison { first_difference: None, source_size, image_size })
    }
}

/// A piece of the image read by the reader thread.
struct Chunk {
    /// Byte offset in the image (a multiple of 4096).
    at: u64,
    /// Bytes read; the buffer is zero-padded to whole blocks.
    read: usize,
    /// The buffer, returned to the reader once stored.
    buf: Vec<u8>,
}

/// Buffers of `CHUNK` bytes circulating between the reader thread and the importer.
const READ_AHEAD: usize = 2;

/// Reads the data regions of the image (holes skipped with SEEK_DATA/SEEK_HOLE) into buffers
/// taken from `empty`, in order, and sends them on `full`. Stops when either channel closes.
fn read_chunks(
    f: &File,
    size: u64,
    empty: &crossbeam_channel::Receiver<Vec<u8>>,
    full: &crossbeam_channel::Sender<std::io::Result<Chunk>>,
) {
    let end = size.div_ceil(BS) * BS;
    let mut pos = 0u64;
    while pos < size {
        let Some((ds, de)) = next_data(f, pos, size) else { return };
        // Work in whole blocks: round the region out to 4 KiB.
        let (ds, de) = (ds / BS * BS, de.div_ceil(BS) * BS);
        let mut at = ds.max(pos);
        while at < de.min(end) {
            let Ok(mut buf) = empty.recv() else { return };
            let want = ((de.min(end) - at) as usize).min(CHUNK);
            let n = match read_full(f, at, &mut buf[..want]) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    let _ = full.send(Err(e));
                    return;
                }
            };
            let blocks = n.div_ceil(BLOCK_SIZE);
            buf[n..blocks * BLOCK_SIZE].fill(0);
            if full.send(Ok(Chunk { at, read: n, buf })).is_err() {
                return;
            }
            at += (blocks * BLOCK_SIZE) as u64;
        }
        pos = at.max(de);
    }
}

fn read_full(f: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
