//! NBD listeners bound first and opened last.
//!
//! Scripts, tests and `xtask` take "the NBD port accepts a connection" to mean "the daemon is
//! up". So the NBD sockets are bound at the start (a port another process listens on fails the
//! start before anything is served) but only listen once every other transport and the control
//! socket are there: until then a client's connect is refused rather than queued. (With
//! `SO_REUSEADDR` a bind conflicts only with a listening socket; a port taken in between fails
//! at [`BoundTcp::listen`].)

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// How many connections the kernel queues before the accept loop takes them (clamped by
/// `net.core.somaxconn`).
const BACKLOG: i32 = 1024;

/// A TCP socket bound to its address but not yet listening.
pub struct BoundTcp(OwnedFd);

impl BoundTcp {
    /// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
        let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
        rustix::net::bind(&fd, &addr)?;
        Ok(BoundTcp(fd))
    }

    /// Starts accepting connections.
    pub fn listen(self) -> io::Result<TcpListener> {
        rustix::net::listen(&self.0, BACKLOG)?;
        Ok(TcpListener::from(self.0))
    }
}

/// A Unix-domain stream socket bound to its path but not yet listening: a connect to the path
/// is refused until [`BoundUnix::listen`].
pub struct BoundUnix(OwnedFd);

impl BoundUnix {
    /// Binds `path`, which must not exist.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let addr = SocketAddrUnix::new(path)?;
        let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        rustix::net::bind(&fd, &addr)?;
        Ok(BoundUnix(fd))
    }

    /// Starts accepting connections.
    pub fn listen(self) -> io::Result<UnixListener> {
        rustix::net::listen(&self.0, BACKLOG)?;
        Ok(UnixListener::from(self.0))
    }
}
