//! The one "disk" trait of Parallax.
//!
//! Transports (`nbd`, `blktap`) and tests serve a [`BlockDevice`]; they never know how the bytes
//! are stored. The `vdi` crate implements it for VDIs and snapshots; [`MemDisk`] is a sparse
//! in-memory disk for tests of the transports.

mod mem;

use std::io::{IoSlice, IoSliceMut};

pub use mem::MemDisk;

/// What went wrong in a block-device operation, in the terms a transport reports to its client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// The request reaches past the end of the device.
    #[error("request {offset}+{len} reaches past the end of the device ({size} bytes)")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },
    /// A write, discard or flush was sent to a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// The backing store has no free space left.
    #[error("no space left in the block store")]
    NoSpace,
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The device is damaged or an I/O failed; the message says where.
    #[error("I/O error: {0}")]
    Io(String),
}

impl DevError {
    /// The POSIX errno a transport should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DevError::OutOfRange { .. } => 22, // EINVAL
            DevError::ReadOnly => 1,           // EPERM
            DevError::NoSpace => 28,           // ENOSPC
            DevError::Unsupported(_) => 95,    // EOPNOTSUPP
            DevError::Io(_) => 5,              // EIO
        }
    }
}

/// Result of a block-device operation.
pub type DevResult<T> = Result<T, DevError>;

/// Whether a range of the device holds data or reads as zeros without storage behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Storage is allocated; contents may be anything, including zeros.
    Data,
    /// Nothing is allocated; the range reads as zeros.
    Hole,
}

/// A run of bytes with one allocation status, as returned by [`BlockDevice::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte of the run.
    pub offset: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// Allocated or hole.
    pub kind: ExtentKind,
}

/// What [`BlockDevice::try_read_at`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryRead {
    /// The buffer holds the bytes. The allocation status of the range read, as
    /// [`BlockDevice::extents`] gives it (holes read as zeros).
    Done(Vec<Extent>),
    /// The read would have waited for a disk or a network; the buffer holds anything. Read
    /// again with [`BlockDevice::read_at`], on a thread that may wait.
    WouldWait,
}

/// A virtual disk: byte-addressed reads and writes, flush, discard and allocation status.
///
/// Every method may be called from many threads at once. Offsets and lengths need not be aligned
/// to [`BlockDevice::block_size`]; implementations handle partial blocks.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// The device's natural block size (a power of two, at least 512).
    fn block_size(&self) -> u32 {
        4096
    }

    /// True if writes, discards and flushes are refused.
    fn read_only(&self) -> bool;

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()>;

    /// Writes `data` at `offset`. With `fua` the data is durable when this returns.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()>;

    /// Fills `buf` with the bytes at `offset` if that needs no wait for a medium (everything it
    /// needs is in memory or a page cache); otherwise [`TryRead::WouldWait`]. For a server's
    /// thread that reads requests, so a read served from memory skips the hand-off to a
    /// worker. Errors are those of [`BlockDevice::read_at`]. By default every read may wait.
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        let _ = (offset, buf);
        Ok(TryRead::WouldWait)
    }

    /// Fills `bufs`, in order, with the bytes at `offset`: one read of their total length into
    /// the caller's scattered memory (a guest's buffers), without a bounce copy where the
    /// device implements it. By default, one [`BlockDevice::read_at`] per buffer.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size())?;
        let mut at = offset;
        for buf in bufs.iter_mut() {
            self.read_at(at, buf)?;
            at += buf.len() as u64;
        }
        Ok(())
    }

    /// Writes `bufs`, in order, at `offset`: one write of their total length (with `fua`,
    /// durable when this returns). By default the buffers are gathered into one and written
    /// with [`BlockDevice::write_at`], so the write is one request to the device either way.
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        if let [one] = bufs {
            return self.write_at(offset, one, fua);
        }
        let mut all = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in bufs {
            all.extend_from_slice(b);
        }
        self.write_at(offset, &all, fua)
    }

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> DevResult<()>;

    /// True if a write without FUA normally completes without waiting for a disk or a
    /// network — it lands in memory or a page cache — so a server may run it in the thread
    /// that received it instead of handing it to another (the hand-off costs more than such a
    /// write). False, the default, where writes wait for a medium.
    fn writes_land_in_memory(&self) -> bool {
        false
    }

    /// Drops the contents of `len` bytes at `offset`; whole blocks in the range read as zeros
    /// afterwards and their storage is released. Partial blocks at the edges are zeroed.
    fn discard(&self, offset: u64, len: u64) -> DevResult<()>;

    /// Makes `len` bytes at `offset` read as zeros (unmapping whole blocks).
    fn write_zeroes(&self, offset: u64, len: u64) -> DevResult<()> {
        self.discard(offset, len)
    }

    /// Allocation status of `[offset, offset + len)`, in order, covering the range exactly.
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>>;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> DevResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn block_size(&self) -> u32 {
        (**self).block_size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        (**self).write_at(offset, data, fua)
    }
    fn try_read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<TryRead> {
        (**self).try_read_at(offset, buf)
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        (**self).read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        (**self).write_vectored_at(offset, bufs, fua)
    }
    fn flush(&self) -> DevResult<()> {
        (**self).flush()
    }
    fn writes_land_in_memory(&self) -> bool {
        (**self).writes_land_in_memory()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> DevResult<()> {
        (**self).write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        (**self).extents(offset, len)
    }
}
