//! A stop signal that threads wait on instead of polling a flag.
//!
//! [`Shutdown`] is raised once ([`Shutdown::trigger`]) and stays raised. A thread can
//! - block until it is raised ([`Shutdown::wait`]) or until a deadline ([`Shutdown::wait_until`]),
//! - block until a descriptor of its own is readable *or* the signal is raised
//!   ([`Shutdown::wait_readable`]): how accept loops wait for a client without a timeout,
//! - put [`Shutdown::fd`] into its own `poll(2)` set: the descriptor (an eventfd) becomes readable
//!   when the signal is raised and stays readable.
//!
//! Nothing here sleeps to poll: every wait ends on an event (a condition variable, or `poll`
//! without a timeout) or on the caller's own deadline.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use rustix::io::Errno;

/// A stop signal shared by clones: raise it once, every waiter wakes.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    raised: AtomicBool,
    /// Readable once raised (a counter that is written once and never read).
    fd: OwnedFd,
    lock: Mutex<()>,
    changed: Condvar,
}

/// What [`Shutdown::wait_readable`] returned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// The caller's descriptor is readable (or has an error or hang-up to report).
    Readable,
    /// The stop signal is raised.
    Stopped,
    /// The timeout passed first.
    TimedOut,
}

impl Shutdown {
    /// A signal not yet raised.
    pub fn new() -> io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self {
            inner: Arc::new(Inner {
                raised: AtomicBool::new(false),
                fd,
                lock: Mutex::new(()),
                changed: Condvar::new(),
            }),
        })
    }

    /// Raises the signal and wakes every waiter. Idempotent.
    pub fn trigger(&self) {
        let _g = self.inner.lock.lock();
        if self.inner.raised.swap(true, Ordering::AcqRel) {
            return;
        }
        // An eventfd write of 1 cannot block (the counter starts at 0 and is never read) and
        // cannot fail for a valid descriptor; if it somehow did, waiters on the condition
        // variable still wake, and `is_raised` is already true.
        let _ = rustix::io::write(&self.inner.fd, &1u64.to_ne_bytes());
        self.inner.changed.notify_all();
    }

    /// True once [`Shutdown::trigger`] was called.
    pub fn is_raised(&self) -> bool {
        self.inner.raised.load(Ordering::Acquire)
    }

    /// Blocks until the signal is raised.
    pub fn wait(&self) {
        let mut g = self.inner.lock.lock();
        while !self.is_raised() {
            self.inner.changed.wait(&mut g);
        }
    }

    /// Blocks until the signal is raised or `deadline` passes; true if raised.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut g = self.inner.lock.lock();
        while !self.is_raised() {
            if self.inner.changed.wait_until(&mut g, deadline).timed_out() {
                return self.is_raised();
            }
        }
        true
    }

    /// Blocks until the signal is raised or `timeout` passes; true if raised.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.wait_until(deadline),
            None => {
                self.wait();
                true
            }
        }
    }

    /// A descriptor that is readable once the signal is raised, for the caller's own `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// Blocks until `fd` is readable, the signal is raised, or `timeout` (if any) passes.
    /// The signal wins when both are ready.
    pub fn wait_readable(&self, fd: impl AsFd, timeout: Option<Duration>) -> io::Result<Ready> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if self.is_raised() {
                return Ok(Ready::Stopped);
            }
            let left = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(Ready::TimedOut);
                    }
                    Some(Timespec::try_from(d - now).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 }))
                }
                None => None,
            };
            let mut fds = [PollFd::new(&fd, PollFlags::IN), PollFd::new(&self.inner.fd, PollFlags::IN)];
            match poll(&mut fds, left.as_ref()) {
                Ok(0) => return Ok(Ready::TimedOut),
                Ok(_) => {
                    if !fds[1].revents().is_empty() || self.is_raised() {
                        return Ok(Ready::Stopped);
                    }
                    return Ok(Ready::Readable);
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn waiters_wake_when_raised_and_stay_woken() {
        let s = Shutdown::new().unwrap();
        assert!(!s.is_raised());
        assert!(!s.wait_timeout(Duration::from_millis(1)));
        let t = {
            let s = s.clone();
            std::thread::spawn(move || s.wait())
        };
        let (a, _b) = UnixStream::pair().unwrap();
        let polled = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_readable(&a, None).unwrap())
        };
        s.trigger();
        s.trigger();
        t.join().unwrap();
        assert_eq!(polled.join().unwrap(), Ready::Stopped);
        assert!(s.is_raised());
        assert!(s.wait_timeout(Duration::from_secs(3600)));
        let (c, _d) = UnixStream::pair().unwrap();
        assert_eq!(s.wait_readable(&c, None).unwrap(), Ready::Stopped);
    }

    #[test]
    fn a_readable_descriptor_ends_the_wait() {
        use std::io::Write;
        let s = Shutdown::new().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(s.wait_readable(&a, Some(Duration::from_millis(5))).unwrap(), Ready::TimedOut);
        b.write_all(b"x").unwrap();
        assert_eq!(s.wait_readable(&a, None).unwrap(), Ready::Readable);
    }
}
