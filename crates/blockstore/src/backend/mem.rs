//! In-memory media for tests: a store that can lose power, and one that fails on command.

use std::io::{self, IoSliceMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::Backend;

/// How a simulated power cut treats writes that were not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropAll,
    /// The first `n` unsynced writes survive, the next is torn at a 512-byte boundary after
    /// `torn_sectors` sectors, and the rest are lost.
    Prefix {
        /// Writes that survive whole.
        n: usize,
        /// Sectors of the next write that survive.
        torn_sectors: usize,
    },
    /// Each unsynced write survives or not by the bits of `seed` (writes may be reordered by a
    /// real disk, so any subset is a possible outcome).
    Subset {
        /// Chooses the surviving writes.
        seed: u64,
    },
}

/// One change to the medium that a power cut may lose.
enum Unsynced {
    /// A write of bytes at an offset.
    Write(u64, Vec<u8>),
    /// Growth of the medium to a length (`ftruncate`): lost too unless synced.
    Extend(u64),
}

impl Unsynced {
    /// Applies the change, or its first `keep` bytes, to a durable image.
    fn apply(&self, image: &mut Vec<u8>, keep: usize) {
        match self {
            Unsynced::Write(off, data) => {
                let data = &data[..keep.min(data.len())];
                let end = *off as usize + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[*off as usize..end].copy_from_slice(data);
            }
            Unsynced::Extend(len) => {
                if (image.len() as u64) < *len {
                    image.resize(*len as usize, 0);
                }
            }
        }
    }
}

#[derive(Default)]
struct MemState {
    /// What a reader sees now.
    current: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Unsynced>,
}

/// A store in memory that remembers what was synced, so tests can cut the power.
#[derive(Clone, Default)]
pub struct MemBackend {
    state: Arc<Mutex<MemState>>,
    capacity: u64,
}

impl MemBackend {
    /// An empty medium that can grow without limit.
    pub fn new() -> Self {
        MemBackend { state: Arc::default(), capacity: u64::MAX }
    }

    /// An empty medium that cannot grow past `capacity` bytes (writes beyond fail with ENOSPC).
    pub fn with_capacity(capacity: u64) -> Self {
        MemBackend { state: Arc::default(), capacity }
    }

    /// A medium holding `image`, all of it durable (a crash state to open, say).
    pub fn from_image(image: Vec<u8>) -> Self {
        let state = MemState { current: image.clone(), durable: image, unsynced: Vec::new() };
        MemBackend { state: Arc::new(Mutex::new(state)), capacity: u64::MAX }
    }

    /// Simulates a power cut: unsynced writes and size changes are treated as `mode` says.
    pub fn crash(&self, mode: CrashMode) {
        let mut s = self.state.lock();
        let unsynced = std::mem::take(&mut s.unsynced);
        let mut image = s.durable.clone();
        match mode {
            CrashMode::DropAll => {}
            CrashMode::Prefix { n, torn_sectors } => {
                for (i, change) in unsynced.iter().enumerate() {
                    if i < n {
                        change.apply(&mut image, usize::MAX);
                    } else {
                        change.apply(&mut image, torn_sectors * 512);
                        break;
                    }
                }
            }
            CrashMode::Subset { seed } => {
                let mut x = seed | 1;
                for change in &unsynced {
                    // xorshift64: a deterministic coin per write.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x & 1 == 1 {
                        change.apply(&mut image, usize::MAX);
                    }
                }
            }
        }
        s.current = image.clone();
        s.durable = image;
    }

    /// Number of writes not yet synced.
    pub fn unsynced_writes(&self) -> usize {
        self.state.lock().unsynced.len()
    }

    /// Overwrites bytes directly, as a damaging test would (counts as durable).
    pub fn corrupt(&self, offset: u64, data: &[u8]) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        for img in [&mut s.current, &mut s.durable] {
            let end = offset as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[offset as usize..end].copy_from_slice(data);
        }
    }

    /// Cuts the medium (as durable) to `len` bytes, as a truncating test would.
    pub fn truncate(&self, len: u64) {
        let mut s = self.state.lock();
        s.current.truncate(len as usize);
        s.durable.truncate(len as usize);
        s.unsynced.clear();
    }

    /// A copy of what would survive a power cut now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }
}

impl Backend for MemBackend {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock();
        let start = (offset as usize).min(s.current.len());
        let end = (offset as usize + buf.len()).min(s.current.len());
        let n = end - start;
        buf[..n].copy_from_slice(&s.current[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        // Memory never waits.
        self.read_vectored_at(offset, bufs)?;
        Ok(true)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end > self.capacity {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut s = self.state.lock();
        if s.current.len() < end as usize {
            s.current.resize(end as usize, 0);
        }
        s.current[offset as usize..end as usize].copy_from_slice(data);
        s.unsynced.push(Unsynced::Write(offset, data.to_vec()));
        Ok(())
    }

    fn buffers_writes(&self) -> bool {
        true
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        let unsynced = std::mem::take(&mut s.unsynced);
        for change in unsynced {
            change.apply(&mut s.durable, usize::MAX);
        }
        Ok(())
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        if len > self.capacity {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // Like ftruncate: the medium grows with zeros; the new size is durable only once synced.
        let mut s = self.state.lock();
        if (s.current.len() as u64) < len {
            s.current.resize(len as usize, 0);
            s.unsynced.push(Unsynced::Extend(len));
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.saturating_add(len) > self.capacity {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            Ok(())
        }
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }
}

/// Wraps a backend and fails every write and sync after the first `budget` of them, as a dying
/// disk would. Reads keep working.
pub struct FaultyBackend<B> {
    inner: B,
    budget: AtomicU64,
}

impl<B: Backend> FaultyBackend<B> {
    /// Allows `budget` writes and syncs, then fails the rest with EIO.
    pub fn new(inner: B, budget: u64) -> Self {
        FaultyBackend { inner, budget: AtomicU64::new(budget) }
    }

    fn spend(&self) -> io::Result<()> {
        let ok = self.budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1)).is_ok();
        if ok { Ok(()) } else { Err(io::Error::other("injected fault: the disk stopped accepting writes")) }
    }

    /// Writes and syncs still allowed.
    pub fn remaining(&self) -> u64 {
        self.budget.load(Ordering::Acquire)
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn try_read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<bool> {
        self.inner.try_read_vectored_at(offset, bufs)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.spend()?;
        self.inner.write_at(offset, data)
    }
    fn sync(&self) -> io::Result<()> {
        self.spend()?;
        self.inner.sync()
    }
    fn extend(&self, len: u64) -> io::Result<()> {
        self.inner.extend(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn room(&self, store_bytes: u64) -> io::Result<Option<super::MediumRoom>> {
        self.inner.room(store_bytes)
    }
}
