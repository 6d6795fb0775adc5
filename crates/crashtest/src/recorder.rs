//! A backend that records every change made to it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockstore::{Backend, MemBackend};
use parking_lot::Mutex;

/// One thing a store did to its medium, in the order it did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `pwrite` of bytes at an offset.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `ftruncate` growing the medium to a length.
    Extend {
        /// New length in bytes.
        len: u64,
    },
    /// `fdatasync`: everything before it is durable once it returns.
    Sync,
}

/// A medium in memory that logs every write, size change and sync.
#[derive(Clone)]
pub struct Recorder {
    /// The bytes a reader sees now (what was synced does not matter here: the log says).
    medium: Arc<dyn Backend>,
    /// The log; its lock also orders each change with its entry.
    log: Arc<Mutex<Vec<Op>>>,
    /// Stamps handed out so far; advanced only under the log's lock.
    stamps: Arc<AtomicU64>,
}

/// An instant in a recorded run: the log position then, and a sequence number that orders
/// instants taken at the same position (by different threads, with no change logged between).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// Operations logged before this instant.
    pub position: usize,
    /// Order among all stamps of the recorder.
    pub seq: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::on(Arc::new(MemBackend::new()))
    }
}

impl Recorder {
    /// An empty medium.
    pub fn new() -> Self {
        Recorder::default()
    }

    /// A recorder passing everything on to `medium` (a store in RADOS, say), which must be
    /// empty: the log is all that was ever written to it.
    pub fn on(medium: Arc<dyn Backend>) -> Self {
        Recorder { medium, log: Arc::default(), stamps: Arc::default() }
    }

    /// Number of operations logged so far: a position in the log.
    pub fn position(&self) -> usize {
        self.log.lock().len()
    }

    /// This instant, totally ordered with every other stamp: two threads that read the same
    /// [`position`](Recorder::position) cannot tell which of them came first; their stamps can.
    pub fn stamp(&self) -> Stamp {
        let log = self.log.lock();
        // The lock is held: stamps follow the order in which the log was seen.
        Stamp { position: log.len(), seq: self.stamps.fetch_add(1, Ordering::Relaxed) }
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<Op> {
        self.log.lock().clone()
    }
}

impl Backend for Recorder {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.medium.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut log = self.log.lock();
        self.medium.write_at(offset, data)?;
        log.push(Op::Write { offset, data: data.to_vec() });
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut log = self.log.lock();
        self.medium.sync()?;
        log.push(Op::Sync);
        Ok(())
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        if self.medium.size()? < len {
            self.medium.extend(len)?;
            log.push(Op::Extend { len });
        }
        Ok(())
    }

    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn capacity(&self) -> u64 {
        u64::MAX
    }

    fn size(&self) -> io::Result<u64> {
        self.medium.size()
    }
}
