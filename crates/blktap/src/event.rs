//! Event channels: how each side of a ring tells the other to look at it.
//!
//! On Xen this is an interdomain event channel (`/dev/xen/evtchn`); in the simulation it is a
//! Unix stream socket where each byte is one notification ([`SocketEvents`]). Notifications
//! carry no data and may be coalesced: a side that is woken always re-reads the ring indices.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, recv, send};

use crate::{Error, Result};

/// What a wait for the peer ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The peer notified us (possibly several times).
    Notified,
    /// Nothing arrived within the timeout.
    TimedOut,
    /// The peer has gone: the channel is closed for good.
    Closed,
}

/// One side of an event channel.
pub trait EventChannel: Send + Sync {
    /// Notifies the peer. Never blocks; a notification the peer has not yet consumed may absorb
    /// this one.
    fn notify(&self) -> Result<()>;
    /// A descriptor that is readable when a notification (or the peer's going away) is
    /// waiting, so a server can wait on it beside a stop signal, then [`EventChannel::take`] it.
    fn readable_fd(&self) -> BorrowedFd<'_>;
    /// Consumes the notifications waiting, without blocking: [`Wake::TimedOut`] if there were
    /// none.
    fn take(&self) -> Result<Wake>;
    /// Waits up to `timeout` for a notification from the peer and consumes it.
    fn wait(&self, timeout: Duration) -> Result<Wake> {
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        let fd = self.readable_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => Ok(Wake::TimedOut),
            Ok(_) => self.take(),
            Err(e) => Err(Error::Io(e.into())),
        }
    }
}

/// A simulated event channel over a connected Unix stream socket: one byte per notification.
#[derive(Debug)]
pub struct SocketEvents {
    stream: UnixStream,
}

impl SocketEvents {
    /// Uses `stream` (already connected to the peer) as the event channel.
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }
}

impl EventChannel for SocketEvents {
    fn notify(&self) -> Result<()> {
        match send(self.stream.as_fd(), &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            // A full socket buffer already holds notifications the peer has not read.
            Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(()),
            Err(Errno::PIPE) | Err(Errno::CONNRESET) => Err(Error::PeerGone),
            Err(e) => Err(Error::Io(e.into())),
        }
    }

    fn take(&self) -> Result<Wake> {
        let mut buf = [0u8; 64];
        match recv(self.stream.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
            Ok((0, _)) => Ok(Wake::Closed),
            Ok(_) => Ok(Wake::Notified),
            Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(Wake::TimedOut),
            Err(Errno::CONNRESET) => Ok(Wake::Closed),
            Err(e) => Err(Error::Io(e.into())),
        }
    }

    fn readable_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_cross_and_closing_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (SocketEvents::new(a), SocketEvents::new(b));
        assert_eq!(b.wait(Duration::from_millis(10)).unwrap(), Wake::TimedOut);
        a.notify().unwrap();
        a.notify().unwrap();
        assert_eq!(b.wait(Duration::from_secs(5)).unwrap(), Wake::Notified);
        // Both bytes were consumed by one wait: notifications coalesce.
        assert_eq!(b.wait(Duration::from_millis(10)).unwrap(), Wake::TimedOut);
        drop(a);
        assert_eq!(b.wait(Duration::from_secs(5)).unwrap(), Wake::Closed);
        assert!(matches!(b.notify(), Err(Error::PeerGone)));
    }
}
