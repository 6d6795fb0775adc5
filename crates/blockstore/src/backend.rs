//! Where the store's bytes live: a file, a block device, or memory.
//!
//! A [`Backend`] is a flat byte array with `pread`/`pwrite`-style calls, `sync` (everything written
//! before it is durable) and space reservation. The store never assumes more than that: a write
//! not followed by a sync may be lost or torn at a 512-byte boundary by a crash.

mod file;
mod mem;

pub use file::FileBackend;
pub use mem::{CrashMode, FaultyBackend, MemBackend};

use std::io::{self, IoSlice, IoSliceMut};

/// A byte-addressed medium the store lives on. Methods may be called from many threads at once.
pub trait Backend: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes never written read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Fills `bufs` in order from the bytes at `offset` (`preadv`). By default one
    /// [`Backend::read_at`] of the whole length into a buffer of its own, copied out: one
    /// request to the medium either way (on RADOS each is a round trip).
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if let [one] = bufs {
            return self.read_at(offset, one);
        }
        let mut all = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
        self.read_at(offset, &mut all)?;
        let mut at = 0;
        for buf in bufs.iter_mut() {
            let n = buf.len();
            buf.copy_from_slice(&all[at..at + n]);
            at += n;
        }
        Ok(())
    }
    /// Fills `bufs` like [`Backend::read_vectored_at`], but only if that needs no wait for the
    /// medium: `Ok(true)` when every byte was read from memory (a page cache), `Ok(false)` when
    /// the read would have waited, leaving `bufs` holding anything. For a caller that has
    /// better things to do than wait (a connection's reader, which hands such a read to a
    /// worker instead). By default `Ok(false)`: every read may wait.
    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        let _ = (offset, bufs);
        Ok(false)
    }
    /// Writes `bufs` in order at `offset` (`pwritev`). By default they are gathered into one
    /// buffer and written with one [`Backend::write_at`]. Like any write, it may be torn by a
    /// crash before the next sync.
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        if let [one] = bufs {
            return self.write_at(offset, one);
        }
        let mut all = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for buf in bufs {
            all.extend_from_slice(buf);
        }
        self.write_at(offset, &all)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// True if a write normally completes without waiting for the medium (a page cache or
    /// memory takes it), as opposed to a network round trip. A hint for how to schedule
    /// writes; it promises nothing about durability. False by default.
    fn buffers_writes(&self) -> bool {
        false
    }
    /// Makes the medium at least `len` bytes long; new bytes read as zeros. On a file this
    /// reserves no space (the file grows sparsely). Fails with `ENOSPC` past a device's end.
    fn extend(&self, len: u64) -> io::Result<()>;
    /// Guarantees space for `[offset, offset + len)`, so later writes there cannot fail for lack
    /// of space (`fallocate` on a file). Fails with `ENOSPC` when the space cannot be had.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The largest size the medium can have (a block device's size; `u64::MAX` for a file).
    fn capacity(&self) -> u64;
    /// The current size of the medium in bytes (a truncated store is caught by comparing it
    /// with the size the superblock records).
    fn size(&self) -> io::Result<u64>;
    /// What the medium under the store says of its room: how much it holds and how much more
    /// it can take, for an operator to see how close to full it is. `None` when the medium
    /// cannot tell (memory). `store_bytes` is the store's size, which a medium the store
    /// grows into (a device) counts as used. Asks the medium (a system call, or round trips
    /// to a cluster) and takes no lock of the store: not for the I/O path.
    fn room(&self, store_bytes: u64) -> io::Result<Option<MediumRoom>> {
        let _ = store_bytes;
        Ok(None)
    }
}

/// The room on the medium under a store, as [`Backend::room`] reports it. The figures are the
/// medium's, not the store's: a file system or a pool holds other things too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediumRoom {
    /// What the figures are of, for people: `file system of /srv/vdis.store`, `device
    /// /dev/sdb`, `pool rbd`, `pool rbd (all its namespaces)`.
    pub medium: String,
    /// Bytes the medium holds now (a file system's used space, a device's part the store
    /// covers, a pool's bytes as its quota counts them: its objects' lengths).
    pub used: u64,
    /// The most it may hold (a file system's or a device's size, a pool's byte quota); `None`
    /// when nothing but the space under it limits it (a pool without a quota).
    pub limit: Option<u64>,
    /// Bytes it can still take: the least of what is left under `limit` and what the space
    /// under it has free (a file system's blocks free to unprivileged users; a cluster's room
    /// for this pool after replication).
    pub available: u64,
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        (**self).read_vectored_at(offset, bufs)
    }
    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        (**self).try_read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        (**self).write_vectored_at(offset, bufs)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn buffers_writes(&self) -> bool {
        (**self).buffers_writes()
    }
    fn extend(&self, len: u64) -> io::Result<()> {
        (**self).extend(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).reserve(offset, len)
    }
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn room(&self, store_bytes: u64) -> io::Result<Option<MediumRoom>> {
        (**self).room(store_bytes)
    }
}
