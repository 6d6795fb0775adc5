//! A backend that records every change made to it.

use std::io;
use std::sync::Arc;

use blockstore::Backend;
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

#[derive(Default)]
struct Inner {
    current: Vec<u8>,
    log: Vec<Op>,
}

/// A medium in memory that logs every write, size change and sync.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// An empty medium.
    pub fn new() -> Self {
        Recorder::default()
    }

    /// Number of operations logged so far: a position in the log.
    pub fn position(&self) -> usize {
        self.inner.lock().log.len()
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<Op> {
        self.inner.lock().log.clone()
    }
}

impl Backend for Recorder {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.inner.lock();
        let start = (offset as usize).min(s.current.len());
        let end = (offset as usize + buf.len()).min(s.current.len());
        let n = end - start;
        buf[..n].copy_from_slice(&s.current[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.inner.lock();
        let end = offset as usize + data.len();
        if s.current.len() < end {
            s.current.resize(end, 0);
        }
        s.current[offset as usize..end].copy_from_slice(data);
        s.log.push(Op::Write { offset, data: data.to_vec() });
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.lock().log.push(Op::Sync);
        Ok(())
    }

    fn extend(&self, len: u64) -> io::Result<()> {
        let mut s = self.inner.lock();
        if (s.current.len() as u64) < len {
            s.current.resize(len as usize, 0);
            s.log.push(Op::Extend { len });
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
        Ok(self.inner.lock().current.len() as u64)
    }
}
