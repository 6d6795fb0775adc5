//! The block store's medium on RADOS: its byte array cut into objects of [`OBJECT_SIZE`].
//!
//! Layout in the pool (and namespace):
//! - `parallax.store`, the header object: no data; extended attributes
//!   `parallax.format` (`"1"`, written once the store's first blocks are), `parallax.object_size`
//!   (decimal bytes), `parallax.size` (the medium's length, decimal bytes), and the lease
//!   ([`crate::lease`]).
//! - `parallax.data.%016x`: bytes `[i * OBJECT_SIZE, (i + 1) * OBJECT_SIZE)` of the medium,
//!   object `i`; absent or short objects read as zeros.
//!
//! What the store's commit protocol needs from a medium, and why RADOS gives it: a completed
//! write must be durable (a RADOS write is acknowledged once it is committed on every replica,
//! so `sync` has nothing left to do), and unsynced writes may be lost, reordered or torn at
//! 512 bytes. RADOS is stricter: a write to one object is atomic and writes to one object are
//! applied in order; a write that spans two objects is two writes, which may land one without
//! the other — a tear at an object boundary, itself a multiple of 512. So every crash state
//! RADOS can leave is one of those the crash-state suite already builds and checks.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockstore::{Backend, MediumRoom};
use parking_lot::Mutex;

use crate::client::Pool;
use crate::error::{RadosError, Result};
use crate::lease::LeaseClock;

/// Bytes of the medium per data object (like RBD's default).
pub const OBJECT_SIZE: u64 = 4 << 20;
/// The header object.
pub const HEADER_OBJECT: &str = "parallax.store";
const FORMAT_XATTR: &str = "parallax.format";
const OBJECT_SIZE_XATTR: &str = "parallax.object_size";
const SIZE_XATTR: &str = "parallax.size";

/// True if the pool (and namespace) of `pool` holds a store: its header records a format.
pub fn is_store(pool: &Pool) -> Result<bool> {
    Ok(pool.xattr(HEADER_OBJECT, FORMAT_XATTR)?.is_some())
}

/// The data object holding medium bytes from `index * OBJECT_SIZE`.
pub fn data_object(index: u64) -> String {
    format!("parallax.data.{index:016x}")
}

/// A block store medium in a RADOS pool.
pub struct RadosBackend {
    pool: Arc<Pool>,
    /// The medium's length, as `parallax.size` records it (this process is its only writer).
    size: AtomicU64,
    /// Serialises growing, so the recorded size only ever grows.
    growing: Mutex<()>,
    /// Reads and writes stop when this says the lease is gone.
    lease: Arc<LeaseClock>,
    /// False for a reader (a shared lease): writes are refused.
    writable: bool,
    /// How long [`Backend::reserve`] has made each data object (by index): the object is at
    /// least that long, so a range below needs no round trip. At most one entry per data
    /// object of the medium.
    reserved: Mutex<HashMap<u64, u64>>,
}

fn parse_u64(what: &str, v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| RadosError::BadHeader(format!("{what} is {:?}", String::from_utf8_lossy(v))))
}

impl RadosBackend {
    /// Opens the medium in `pool`; `None` if there is none yet (or its creation never finished:
    /// see [`RadosBackend::seal`]). Reads and writes check `lease`; writes need `writable`.
    pub fn open(pool: Arc<Pool>, lease: Arc<LeaseClock>, writable: bool) -> Result<Option<RadosBackend>> {
        let Some(format) = pool.xattr(HEADER_OBJECT, FORMAT_XATTR)? else { return Ok(None) };
        if format != b"1" {
            return Err(RadosError::BadHeader(format!(
                "format {:?} is not one this build knows (1)",
                String::from_utf8_lossy(&format)
            )));
        }
        let object_size = pool.xattr(HEADER_OBJECT, OBJECT_SIZE_XATTR)?.unwrap_or_default();
        let object_size = parse_u64(OBJECT_SIZE_XATTR, &object_size)?;
        if object_size != OBJECT_SIZE {
            return Err(RadosError::BadHeader(format!(
                "objects of {object_size} bytes; this build uses {OBJECT_SIZE}"
            )));
        }
        let size = parse_u64(SIZE_XATTR, &pool.xattr(HEADER_OBJECT, SIZE_XATTR)?.unwrap_or_default())?;
        Ok(Some(RadosBackend {
            pool,
            size: AtomicU64::new(size),
            growing: Mutex::new(()),
            lease,
            writable,
            reserved: Mutex::default(),
        }))
    }

    /// Makes an empty medium in `pool` for a writer. It is not a store until
    /// [`RadosBackend::seal`] records the format, once the store's first blocks are written: a
    /// creation cut short is "no store" to the next open, which makes it again — removing the
    /// data objects the unfinished one wrote (as far as its recorded size), so nothing of it is
    /// read back.
    pub fn create(pool: Arc<Pool>, lease: Arc<LeaseClock>) -> Result<RadosBackend> {
        lease.check()?;
        if let Some(old) = pool.xattr(HEADER_OBJECT, SIZE_XATTR)? {
            let old = parse_u64(SIZE_XATTR, &old).unwrap_or(0);
            for index in 0..old.div_ceil(OBJECT_SIZE) {
                lease.check()?;
                pool.remove(&data_object(index))?;
            }
        }
        pool.set_xattr(HEADER_OBJECT, OBJECT_SIZE_XATTR, OBJECT_SIZE.to_string().as_bytes())?;
        pool.set_xattr(HEADER_OBJECT, SIZE_XATTR, b"0")?;
        Ok(RadosBackend {
            pool,
            size: AtomicU64::new(0),
            growing: Mutex::new(()),
            lease,
            writable: true,
            reserved: Mutex::default(),
        })
    }

    /// The pool (and namespace) the medium is in.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Records the format on the header: from now on the pool holds a store.
    pub fn seal(&self) -> Result<()> {
        self.lease.check()?;
        self.pool.set_xattr(HEADER_OBJECT, FORMAT_XATTR, b"1")
    }

    fn may_read(&self) -> io::Result<()> {
        self.lease.check().map_err(RadosError::into_io)
    }

    fn may_write(&self) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the store is open read-only"));
        }
        self.lease.check().map_err(RadosError::into_io)
    }
}

/// `offset + len` as the end of a range, or `EINVAL` past the largest offset.
fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset.checked_add(len as u64).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The object pieces of `[offset, offset + len)`: (object index, offset in it, bytes).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize)> {
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let index = at / OBJECT_SIZE;
        let within = at % OBJECT_SIZE;
        let n = (OBJECT_SIZE - within).min(end - at);
        at += n;
        Some((index, within, n as usize))
    })
}

impl Backend for RadosBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.may_read()?;
        end_of(offset, buf.len())?;
        let mut done = 0;
        for (index, within, n) in pieces(offset, buf.len()) {
            let part = &mut buf[done..done + n];
            let got = self.pool.read(&data_object(index), within, part).map_err(RadosError::into_io)?;
            part[got..].fill(0);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.may_write()?;
        end_of(offset, data.len())?;
        let mut done = 0;
        for (index, within, n) in pieces(offset, data.len()) {
            self.pool.write(&data_object(index), within, &data[done..done + n]).map_err(RadosError::into_io)?;
            done += n;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        // Every completed write is already durable on all replicas.
        Ok(())
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        let _g = self.growing.lock();
        if len <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        self.may_write()?;
        self.pool.set_xattr(HEADER_OBJECT, SIZE_XATTR, len.to_string().as_bytes()).map_err(RadosError::into_io)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// Space in a pool is counted by object lengths, and a full pool refuses only writes that
    /// lengthen an object. So each data object the range touches is made at least long enough
    /// to hold it ([`Pool::extend_object`], which changes no byte; one round trip per object
    /// unless an earlier reserve of this process already covered the range), and the commit's
    /// later writes there land even when the pool has filled meanwhile. Like `fallocate`, it
    /// reserves the range and no more, so a pool's usage follows what the store uses. Fails
    /// with EDQUOT or ENOSPC on a full pool.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.may_write()?;
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        end_of(offset, len)?;
        for (index, within, n) in pieces(offset, len) {
            let end = within + n as u64;
            if self.reserved.lock().get(&index).is_some_and(|&done| done >= end) {
                continue;
            }
            self.pool.extend_object(&data_object(index), end).map_err(RadosError::into_io)?;
            let mut reserved = self.reserved.lock();
            let done = reserved.entry(index).or_insert(0);
            *done = (*done).max(end);
        }
        Ok(())
    }

    fn capacity(&self) -> u64 {
        u64::MAX
    }

    /// The pool's used bytes (as its quota counts them), quota and room, as the cluster sees
    /// them. A store in a namespace shares them with every other namespace of its pool.
    fn room(&self, _store_bytes: u64) -> io::Result<Option<MediumRoom>> {
        let room = self.pool.room().map_err(RadosError::into_io)?;
        let medium = match self.pool.namespace() {
            Some(_) => format!("pool {} (all its namespaces)", self.pool.name()),
            None => format!("pool {}", self.pool.name()),
        };
        Ok(Some(MediumRoom { medium, used: room.used, limit: room.quota, available: room.available }))
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_object_boundaries() {
        let v: Vec<_> = pieces(OBJECT_SIZE - 512, 4096).collect();
        assert_eq!(v, vec![(0, OBJECT_SIZE - 512, 512), (1, 0, 3584)]);
        let v: Vec<_> = pieces(3 * OBJECT_SIZE, 4096).collect();
        assert_eq!(v, vec![(3, 0, 4096)]);
        assert_eq!(pieces(7, 0).count(), 0);
        assert_eq!(data_object(0x1f), "parallax.data.000000000000001f");
    }
}
