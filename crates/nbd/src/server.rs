//! Accepting connections on a listener, one thread per connection, with a shutdown handle.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use crate::{ExportProvider, Limits, NbdStream};

/// A running NBD server: an accept thread plus one thread per connection.
///
/// [`Server::shutdown`] stops accepting and ends every connection after its in-flight requests
/// are answered; [`Server::wait`] (or dropping the server) waits for all threads.
pub struct Server {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    provider: Arc<dyn ExportProvider>,
    limits: Limits,
    /// Raised by [`Server::shutdown`]; the accept loop waits on it beside the listener.
    stopping: shutdown::Shutdown,
    conns: Mutex<Registry>,
    idle: Condvar,
}

/// Live connections, each with a way to stop it and where it is in its life.
#[derive(Default)]
struct Registry {
    next_id: u64,
    live: HashMap<u64, Conn>,
}

/// One live connection.
struct Conn {
    /// Shuts its socket down: `Read` to stop taking requests (in-flight ones are still
    /// answered), `Both` to end a handshake at once.
    stop: Box<dyn Fn(Shutdown) + Send>,
    /// Past the handshake: a session.
    serving: bool,
    /// Dropped to make room for a newcomer; its thread is finishing.
    evicted: bool,
    /// When it was accepted.
    since: std::time::Instant,
    /// Who it comes from, for fairness: the peer's IP address, or the peer's uid on a Unix
    /// socket.
    origin: String,
}

impl Registry {
    fn sessions(&self) -> usize {
        self.live.values().filter(|c| c.serving).count()
    }

    /// How many connections are in their handshake (not evicted), and which one to drop for a
    /// newcomer: among those that have had their `grace`, one of the origin with the most
    /// handshakes, the oldest of those. A client flooding the server with silent sockets thus
    /// loses its own; another client's slow handshake is not dropped while the flood lasts.
    fn handshakes(&self, grace: std::time::Duration) -> (usize, Option<(u64, std::time::Instant)>) {
        let mut per_origin: HashMap<&str, usize> = HashMap::new();
        for c in self.live.values().filter(|c| !c.serving && !c.evicted) {
            *per_origin.entry(c.origin.as_str()).or_default() += 1;
        }
        let victim = self
            .live
            .iter()
            .filter(|(_, c)| !c.serving && !c.evicted && c.since.elapsed() >= grace)
            .max_by_key(|(_, c)| (per_origin[c.origin.as_str()], std::cmp::Reverse(c.since)))
            .map(|(id, c)| (*id, c.since));
        (per_origin.values().sum(), victim)
    }
}

/// The origin a TCP client counts under for fairness: its IPv4 address (also when it comes
/// as an IPv4-mapped IPv6 address), or its IPv6 /64. One IPv6 host usually holds a whole /64,
/// so counting full addresses would let it pass for 2^64 clients.
fn origin_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
    }
}

impl Server {
    /// Serves clients accepted on `listener` (TCP, with `TCP_NODELAY`) from a background thread.
    pub fn spawn_tcp(listener: TcpListener, provider: Arc<dyn ExportProvider>, limits: Limits) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let readable = OwnedFd::from(listener.try_clone()?);
        Server::spawn(provider, limits, readable, move || {
            let (s, peer) = listener.accept()?;
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            debug!(%peer, "accepted TCP connection");
            Ok((s, format!("tcp:{peer}"), origin_of(peer.ip())))
        })
    }

    /// Serves clients accepted on a Unix-domain `listener` from a background thread.
    pub fn spawn_unix(listener: UnixListener, provider: Arc<dyn ExportProvider>, limits: Limits) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let readable = OwnedFd::from(listener.try_clone()?);
        Server::spawn(provider, limits, readable, move || {
            let (s, _) = listener.accept()?;
            s.set_nonblocking(false)?;
            // The peer's process, as the kernel recorded it at connect time.
            let (client, origin) = match rustix::net::sockopt::socket_peercred(&s) {
                Ok(c) => (
                    format!("unix:pid={},uid={}", c.pid.as_raw_nonzero(), c.uid.as_raw()),
                    format!("uid:{}", c.uid.as_raw()),
                ),
                Err(_) => ("unix".to_string(), "unix".to_string()),
            };
            debug!(%client, "accepted Unix connection");
            Ok((s, client, origin))
        })
    }

    /// Runs `accept` (non-blocking) each time `readable` (the listener) becomes readable; it
    /// returns the stream, how to name the client in logs, and its origin (for fairness).
    fn spawn<S, A>(
        provider: Arc<dyn ExportProvider>,
        limits: Limits,
        readable: OwnedFd,
        accept: A,
    ) -> io::Result<Server>
    where
        S: NbdStream + 'static,
        A: FnMut() -> io::Result<(S, String, String)> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            provider,
            limits: limits.normalized(),
            stopping: shutdown::Shutdown::new()?,
            conns: Mutex::new(Registry::default()),
            idle: Condvar::new(),
        });
        let sh = shared.clone();
        let acceptor =
            thread::Builder::new().name("nbd-accept".into()).spawn(move || accept_loop(&sh, &readable, accept))?;
        Ok(Server { shared, acceptor: Some(acceptor) })
    }

    /// Number of connections being served right now.
    pub fn active_connections(&self) -> usize {
        self.shared.conns.lock().live.len()
    }

    /// Stops accepting and tells every connection to stop reading requests; requests already
    /// received are still answered. Returns at once; see [`Server::wait`].
    pub fn shutdown(&self) {
        let reg = self.shared.conns.lock();
        if !self.shared.stopping.is_raised() {
            info!(connections = reg.live.len(), "NBD server shutting down");
        }
        self.shared.stopping.trigger();
        for c in reg.live.values() {
            (c.stop)(Shutdown::Read);
        }
    }

    /// Shuts down (if not yet done) and waits until the accept thread and every connection
    /// thread have finished.
    pub fn wait(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        self.shutdown();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let mut reg = self.shared.conns.lock();
        while !reg.live.is_empty() {
            self.shared.idle.wait(&mut reg);
        }
    }
}

impl Drop for Server {
    /// Same as [`Server::wait`].
    fn drop(&mut self) {
        self.finish();
    }
}

/// How long the accept loop backs off after an accept error that would otherwise repeat at
/// once (out of descriptors); a stop still ends the wait at once.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts clients whenever the listener is readable, until the server is shut down. Waits on
/// the listener and the stop signal together: no timeout, no polling.
fn accept_loop<S, A>(shared: &Arc<Shared>, readable: &OwnedFd, mut accept: A)
where
    S: NbdStream + 'static,
    A: FnMut() -> io::Result<(S, String, String)>,
{
    loop {
        match shared.stopping.wait_readable(readable, None) {
            Ok(shutdown::Ready::Stopped) => break,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "waiting for NBD clients failed; the server stops accepting");
                break;
            }
        }
        match accept() {
            Ok((stream, client, origin)) => start_connection(shared, stream, client, origin),
            // Another wake-up took it, or the client went away before we got to it.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                // E.g. out of file descriptors: the listener stays readable, so back off
                // (ending early on a stop) rather than spin.
                warn!(error = %e, "accept failed");
                if shared.stopping.wait_timeout(ACCEPT_BACKOFF) {
                    break;
                }
            }
        }
    }
    debug!("NBD accept loop stopped");
}

fn start_connection<S: NbdStream + 'static>(shared: &Arc<Shared>, stream: S, client: String, origin: String) {
    let control = match stream.clone_stream() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "could not clone an accepted stream; dropping it");
            return;
        }
    };
    let id = {
        let mut reg = shared.conns.lock();
        if shared.stopping.is_raised() {
            return;
        }
        let (handshaking, victim) = reg.handshakes(shared.limits.handshake_grace);
        if handshaking >= shared.limits.max_handshakes {
            // Full of handshakes: one that has had its grace makes room, from the origin with
            // the most; a client that connects and says nothing cannot keep others out.
            match victim {
                Some((old, since)) => {
                    if let Some(c) = reg.live.get_mut(&old) {
                        c.evicted = true;
                        (c.stop)(Shutdown::Both);
                    }
                    warn!(
                        max = shared.limits.max_handshakes,
                        waited_ms = since.elapsed().as_millis() as u64,
                        "NBD handshakes full: dropped an unfinished one of the busiest origin for a new client"
                    );
                }
                None => {
                    warn!(max = shared.limits.max_handshakes, "NBD handshakes full; refusing a new client");
                    let _ = stream.shutdown_stream(Shutdown::Both);
                    return;
                }
            }
        }
        let id = reg.next_id;
        reg.next_id += 1;
        reg.live.insert(
            id,
            Conn {
                stop: Box::new(move |how| {
                    let _ = control.shutdown_stream(how);
                }),
                serving: false,
                evicted: false,
                since: std::time::Instant::now(),
                origin,
            },
        );
        id
    };
    let sh = shared.clone();
    let spawned = thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
        let provider = ForClient { inner: &*sh.provider, client: &client, shared: &sh };
        let session_started = || {
            if let Some(c) = sh.conns.lock().live.get_mut(&id) {
                c.serving = true;
            }
        };
        match crate::stream::serve_connection_then(stream, &provider, &sh.limits, &session_started) {
            Ok(()) => debug!(id, "NBD connection closed"),
            Err(e) => info!(id, error = %e, "NBD connection ended with an error"),
        }
        let mut reg = sh.conns.lock();
        reg.live.remove(&id);
        sh.idle.notify_all();
    });
    if let Err(e) = spawned {
        warn!(error = %e, "could not start a connection thread");
        let mut reg = shared.conns.lock();
        reg.live.remove(&id);
        shared.idle.notify_all();
    }
}

/// The server's provider as one connection sees it: every open names the client, and none
/// is granted while the server serves its limit of sessions.
struct ForClient<'a> {
    inner: &'a dyn ExportProvider,
    client: &'a str,
    shared: &'a Shared,
}

impl ExportProvider for ForClient<'_> {
    fn list(&self) -> Vec<crate::ExportInfo> {
        self.inner.list()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn blockdev::BlockDevice>, crate::OpenError> {
        self.open_for(name, self.client)
    }

    fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn blockdev::BlockDevice>, crate::OpenError> {
        let max = self.shared.limits.max_connections;
        if self.shared.conns.lock().sessions() >= max {
            warn!(max, client, "NBD sessions full; refusing an export");
            return Err(crate::OpenError::Refused(format!(
                "the server already serves its limit of {max} connections; try again later"
            )));
        }
        self.inner.open_for(name, client)
    }
}

#[cfg(test)]
mod origin_tests {
    use super::origin_of;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(origin_of(ip("192.0.2.7")), "192.0.2.7");
        assert_eq!(origin_of(ip("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(origin_of(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(origin_of(ip("2001:db8:1:2:ffff:1:2:3")), origin_of(ip("2001:db8:1:2::9")));
        assert_ne!(origin_of(ip("2001:db8:1:2::1")), origin_of(ip("2001:db8:1:3::1")));
        assert_eq!(origin_of(ip("::1")), "::/64");
    }
}
