//! A wake-up signal a thread can wait for in `poll(2)` beside other descriptors: an eventfd
//! that is readable from [`Wakeup::signal`] until [`Wakeup::clear`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::event::{EventfdFlags, eventfd};
use rustix::io::Errno;

use crate::{Error, Result};

/// A cloneable wake-up signal (all clones share one eventfd).
#[derive(Debug, Clone)]
pub struct Wakeup {
    fd: Arc<OwnedFd>,
}

impl Wakeup {
    /// A new signal, not raised.
    pub fn new() -> Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| Error::Io(e.into()))?;
        Ok(Self { fd: Arc::new(fd) })
    }

    /// Raises the signal: the descriptor becomes readable.
    pub fn signal(&self) {
        // Adding 1 to a counter that `clear` keeps near 0 cannot overflow or block.
        let _ = rustix::io::write(&*self.fd, &1u64.to_ne_bytes());
    }

    /// Lowers the signal. Whoever waits clears first, then looks at what it was woken for, so
    /// a signal raised meanwhile is never lost.
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        loop {
            match rustix::io::read(&*self.fd, &mut buf) {
                Err(Errno::INTR) => continue,
                _ => return, // read (counter reset) or EAGAIN (not raised)
            }
        }
    }
}

impl AsFd for Wakeup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
