//! The bound on payload bytes that every connection of a daemon holds in memory together.

use std::fmt;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// Payload bytes (write data not yet written, read data not yet sent) that all connections
/// sharing this pool may hold at once. A handle: clones share one bound, so a daemon that gives
/// the same [`crate::Limits`] to several servers bounds them all together.
///
/// Each connection is also bounded on its own (`Limits::max_buffered_bytes_per_conn`) and a
/// read holds at most one piece (1 MiB) per worker, so a few clients that stop reading their
/// replies cannot take the whole pool from the rest.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

struct Inner {
    max: u64,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Default)]
struct State {
    used: u64,
    peak: u64,
}

impl BufferPool {
    /// A pool of `max_bytes` (at least 1 MiB).
    pub fn new(max_bytes: u64) -> BufferPool {
        BufferPool {
            inner: Arc::new(Inner {
                max: max_bytes.max(1 << 20),
                state: Mutex::new(State::default()),
                freed: Condvar::new(),
            }),
        }
    }

    /// The bound.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max
    }

    /// Bytes held right now.
    pub fn in_use(&self) -> u64 {
        self.inner.state.lock().used
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.inner.state.lock().peak
    }

    /// Takes `bytes`, waiting while the holders would go past the bound. A take larger than the
    /// whole pool waits until the pool is empty and then goes alone, so it cannot wait forever.
    pub(crate) fn take(&self, bytes: u64) -> Held {
        if bytes > 0 {
            let mut s = self.inner.state.lock();
            while !admits(s.used, bytes, self.inner.max) {
                self.inner.freed.wait(&mut s);
            }
            s.used += bytes;
            s.peak = s.peak.max(s.used);
        }
        Held { pool: self.inner.clone(), bytes }
    }
}

/// True if a take of `bytes` may go ahead with `used` bytes held in a pool of `max`: it fits,
/// or the pool is empty (an oversized take goes alone, never ahead of others' bytes).
fn admits(used: u64, bytes: u64, max: u64) -> bool {
    used == 0 || used + bytes <= max
}

impl Default for BufferPool {
    /// 1 GiB.
    fn default() -> Self {
        BufferPool::new(1 << 30)
    }
}

impl PartialEq for BufferPool {
    /// The same pool (not merely the same size).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for BufferPool {}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool").field("max_bytes", &self.inner.max).field("in_use", &self.in_use()).finish()
    }
}

/// Bytes taken from a [`BufferPool`]; given back when dropped.
pub(crate) struct Held {
    pool: Arc<Inner>,
    bytes: u64,
}

impl Held {
    /// Takes over `other`'s bytes (from the same pool): both are given back together.
    pub(crate) fn absorb(&mut self, mut other: Held) {
        debug_assert!(Arc::ptr_eq(&self.pool, &other.pool));
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut s = self.pool.state.lock();
            debug_assert!(s.used >= self.bytes);
            s.used -= self.bytes;
            self.pool.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_wait_for_room_and_an_oversized_take_goes_alone() {
        let pool = BufferPool::new(2 << 20);
        let a = pool.take(1 << 20);
        let b = pool.take(1 << 20);
        assert_eq!(pool.in_use(), 2 << 20);
        let p = pool.clone();
        let waiter = std::thread::spawn(move || {
            let _big = p.take(8 << 20);
            p.in_use()
        });
        drop(a);
        // Still 1 MiB held: the 8 MiB take waits for the pool to empty.
        assert!(!admits(1 << 20, 8 << 20, 2 << 20), "an oversized take went ahead of others' bytes");
        assert!(admits(0, 8 << 20, 2 << 20) && admits(1 << 20, 1 << 20, 2 << 20));
        drop(b);
        assert_eq!(waiter.join().unwrap(), 8 << 20);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.peak(), 8 << 20);
    }
}
