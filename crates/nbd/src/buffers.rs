//! The bound on payload bytes that every connection of a daemon holds in memory together, and
//! the payload buffers they reuse.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::room::wait_for_room;

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
    /// Large buffers given back, kept for the next request instead of being freed: a 1 MiB
    /// buffer allocated per request cost its page faults and its zeroing every time (~15% of
    /// the server's CPU on 1 MiB writes). At most [`SPARES_MAX`] of them.
    spares: Mutex<Vec<Vec<u8>>>,
}

/// Buffers of at least this many bytes are kept for reuse; smaller ones come from the
/// allocator's own caches as cheaply.
const REUSE_MIN: usize = 64 << 10;

/// The room every reused buffer has, so any of them serves any request that reuses: a 1 MiB
/// piece and the longest chunk head. Longer buffers (a write's payload may be 32 MiB) are
/// allocated for the request and freed after it.
const REUSE_CAPACITY: usize = (1 << 20) + 64;

/// How many bytes a reused buffer may have touched beyond its request's length: a chunk head.
const HEAD_SLACK: usize = 64;

/// The most idle buffers a pool keeps (8 MiB).
const SPARES_MAX: usize = 8;

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
                spares: Mutex::new(Vec::new()),
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

    /// [`BufferPool::take_or`] with nothing to do before waiting.
    #[cfg(test)]
    pub(crate) fn take(&self, bytes: u64) -> Held {
        self.take_or(bytes, || ())
    }

    /// Takes `bytes`, waiting while the holders would go past the bound; `before_wait` runs
    /// (without the pool's lock) before the first wait, if there is one
    /// ([`crate::room::wait_for_room`]). A take larger than the whole pool waits until the pool
    /// is empty and then goes alone, so it cannot wait forever.
    pub(crate) fn take_or(&self, bytes: u64, before_wait: impl FnOnce()) -> Held {
        if bytes > 0 {
            let mut s = self.inner.state.lock();
            let max = self.inner.max;
            wait_for_room(&mut s, &self.inner.freed, |s| !admits(s.used, bytes, max), before_wait);
            s.used += bytes;
            s.peak = s.peak.max(s.used);
        }
        Held { pool: self.inner.clone(), bytes }
    }

    /// A buffer of `len` bytes, reusing the memory of one given back if there is one. **Its
    /// bytes are left over from an earlier request** — possibly another export's data: the
    /// caller fills every byte it sends (a device's `read_at` fills its whole buffer, a
    /// payload is read in full or the connection ends). This is not counted against the pool's
    /// bound; take the bytes with [`BufferPool::take_or`] as for any buffer.
    pub(crate) fn buffer(&self, len: usize) -> Buffer {
        if !self.reuses(len) {
            return Buffer::from(vec![0; len]);
        }
        let spare = {
            let mut spares = self.inner.spares.lock();
            // The fullest spare whose touched bytes fit the request (a chunk head over is
            // allowed): a buffer in use is then never more resident than the bytes its request
            // counts against the bounds, however large a request it served before.
            let fit = spares
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() <= len + HEAD_SLACK)
                .max_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            fit.map(|i| spares.swap_remove(i))
        };
        let mut bytes = spare.unwrap_or_else(|| Vec::with_capacity(REUSE_CAPACITY));
        if bytes.len() < len {
            // Only what lies past the earlier use is zeroed (all of it in a new buffer).
            bytes.resize(len, 0);
        }
        Buffer { bytes, len, home: Some(self.inner.clone()) }
    }

    /// True if a buffer of `len` bytes comes from the spares ([`BufferPool::buffer`]); a longer
    /// one is allocated for its request alone.
    pub(crate) fn reuses(&self, len: usize) -> bool {
        (REUSE_MIN..=REUSE_CAPACITY).contains(&len)
    }

    /// Idle buffers kept for reuse.
    #[cfg(test)]
    fn spares(&self) -> usize {
        self.inner.spares.lock().len()
    }
}

/// A byte buffer from [`BufferPool::buffer`]: its memory goes back to the pool when dropped.
pub(crate) struct Buffer {
    /// As many bytes as any use of this memory has touched; the buffer is the first `len`.
    bytes: Vec<u8>,
    len: usize,
    /// The pool to give a large buffer back to.
    home: Option<Arc<Inner>>,
}

impl Buffer {
    /// An empty buffer that belongs to no pool.
    pub(crate) fn empty() -> Buffer {
        Buffer::from(Vec::new())
    }
}

impl From<Vec<u8>> for Buffer {
    /// `bytes` as a buffer that belongs to no pool.
    fn from(bytes: Vec<u8>) -> Buffer {
        Buffer { len: bytes.len(), bytes, home: None }
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let Some(home) = self.home.take() else { return };
        let mut spares = home.spares.lock();
        if spares.len() < SPARES_MAX {
            spares.push(std::mem::take(&mut self.bytes));
        }
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

    /// `take_or`'s hook runs before a wait — with the pool's lock free (it may take it) —
    /// and never when there is room.
    #[test]
    fn a_take_runs_its_hook_only_before_it_waits() {
        let pool = BufferPool::new(1 << 20);
        let mut ran = false;
        let held = pool.take_or(1 << 20, || ran = true);
        assert!(!ran, "room: no hook");
        let (hooked, hook_ran) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _more = pool.take_or(4096, || hooked.send(pool.in_use()).expect("send"));
            });
            let in_use = hook_ran.recv_timeout(std::time::Duration::from_secs(5));
            let waited_on = !waiter.is_finished();
            // Room again before any assertion, so a failing one ends the test instead of
            // leaving the waiter (and the scope) waiting for ever.
            drop(held);
            waiter.join().expect("waiter");
            assert_eq!(in_use, Ok(1 << 20), "the hook ran, while the pool was full");
            assert!(waited_on, "and the take waited on after it");
        });
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn large_buffers_are_reused_and_the_spares_stay_bounded() {
        let pool = BufferPool::new(1 << 30);
        let mut a = pool.buffer(1 << 20);
        a.fill(0x5a);
        let at = a.as_ptr();
        drop(a);
        assert_eq!(pool.spares(), 1);
        // The same memory, holding what it held: the caller must fill it.
        let b = pool.buffer(1 << 20);
        assert_eq!((b.as_ptr(), b.len(), b[0]), (at, 1 << 20, 0x5a));
        drop(b);
        // A request shorter than what a spare has touched does not take it: a buffer in use
        // is never more resident than its request counts (a head's worth aside).
        let c = pool.buffer(REUSE_MIN);
        assert!(c.as_ptr() != at && c.len() == REUSE_MIN);
        let d = pool.buffer(REUSE_CAPACITY);
        assert!(d.as_ptr() == at && d[..1 << 20].iter().all(|&x| x == 0x5a) && d[1 << 20..].iter().all(|&x| x == 0));
        drop(d);
        assert_eq!(pool.buffer(REUSE_CAPACITY - HEAD_SLACK).as_ptr(), at, "within a head of what it touched");
        // A short buffer given back grows in place for a longer request, zeroing what it adds.
        let c_at = c.as_ptr();
        drop(c);
        let mut e = pool.buffer(1 << 19);
        assert_eq!(e.as_ptr(), c_at, "the fullest spare that fits");
        e.fill(1);
        drop(e);
        let f = pool.buffer(1 << 20);
        assert!(f.as_ptr() == c_at || f.as_ptr() == at);
        drop(f);
        // Small and oversized buffers are not kept, nor more than SPARES_MAX.
        let spares = pool.spares();
        let (small, big) = (pool.buffer(4096), pool.buffer(REUSE_CAPACITY + 1));
        assert!(!pool.reuses(small.len()) && !pool.reuses(big.len()));
        drop((small, big));
        assert_eq!(pool.spares(), spares);
        let many: Vec<Buffer> = (0..SPARES_MAX + 4).map(|_| pool.buffer(1 << 20)).collect();
        assert_eq!(pool.spares(), 0);
        drop(many);
        assert_eq!(pool.spares(), SPARES_MAX);
        drop(Buffer::empty());
    }
}
