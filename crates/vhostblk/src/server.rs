//! The socket a VMM connects to: one VMM at a time, each connection with the device opened
//! afresh, until the server is shut down.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use blockdev::BlockDevice;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::{BlkBackend, VhostBlkError};

/// Opens the device for a VMM that has connected; called once per connection, and the device
/// is dropped when the VMM goes away (so a writer lock taken here is released then).
pub trait OpenDevice: Send + Sync {
    /// The device, or why it cannot be served now (the VMM is then disconnected).
    fn open(&self) -> Result<Arc<dyn BlockDevice>, String>;
}

/// How the device looks to the guest.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Request queues (the guest may use fewer); each is served by its own thread.
    pub queues: usize,
    /// Threads executing each queue's requests side by side (the requests a driver keeps in
    /// flight on one queue run concurrently up to this many); 1 runs them one after another on
    /// the queue's own thread.
    pub workers_per_queue: usize,
    /// Most descriptors per queue.
    pub queue_size: usize,
    /// The disk's serial number (GET_ID; at most 20 bytes are used).
    pub serial: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { queues: 2, workers_per_queue: 4, queue_size: 256, serial: String::new() }
    }
}

/// A vhost-user-blk socket being served from a background thread.
pub struct Server {
    path: PathBuf,
    stopping: shutdown::Shutdown,
    thread: Option<JoinHandle<()>>,
    /// The backend of the VMM connected now, if any.
    current: Arc<parking_lot::Mutex<Option<Arc<BlkBackend>>>>,
}

impl Server {
    /// Listens on `path` (replacing a stale socket there) and serves VMMs one after another:
    /// when one disconnects (or restarts), the next connection is served.
    pub fn spawn(
        path: &Path,
        opener: Arc<dyn OpenDevice>,
        opts: ServerOptions,
        stopping: shutdown::Shutdown,
    ) -> Result<Server, VhostBlkError> {
        let socket_err = |source| VhostBlkError::Socket { path: path.display().to_string(), source };
        // A stale socket of an earlier run is replaced; anything else there is left alone.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(socket_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "something other than a socket is there",
                )));
            }
            let _ = std::fs::remove_file(path);
        }
        let unix = UnixListener::bind(path).map_err(socket_err)?;
        let readable = OwnedFd::from(unix.try_clone().map_err(socket_err)?);
        let listener = Listener::from(unix);
        let p = path.to_path_buf();
        let stop = stopping.clone();
        let current = Arc::new(parking_lot::Mutex::new(None));
        let cur = current.clone();
        let thread = thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || serve(&p, listener, &readable, &*opener, &opts, &stop, &cur))
            .map_err(socket_err)?;
        Ok(Server { path: path.to_path_buf(), stopping, thread: Some(thread), current })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting VMMs and stops serving the one connected now: its queue threads end
    /// and the requests they had taken are finished first, so nothing writes to the device
    /// after this returns. (The VMM's later requests wait until it reconnects to a new
    /// parallaxd: QEMU does with `reconnect=` on the chardev.)
    pub fn shutdown(&mut self) {
        self.stopping.trigger();
        let current = self.current.lock().clone();
        if let Some(backend) = current {
            backend.stop();
        }
        if let Some(t) = self.thread.take()
            && t.is_finished()
        {
            let _ = t.join();
        }
    }
}

fn serve(
    path: &Path,
    mut listener: Listener,
    readable: &OwnedFd,
    opener: &dyn OpenDevice,
    opts: &ServerOptions,
    stop: &shutdown::Shutdown,
    current: &parking_lot::Mutex<Option<Arc<BlkBackend>>>,
) {
    let where_ = path.display().to_string();
    loop {
        // The next VMM (or the stop), waited for without a timeout.
        match stop.wait_readable(readable, None) {
            Ok(shutdown::Ready::Stopped) => break,
            Ok(_) => {}
            Err(e) => {
                warn!(socket = %where_, error = %e, "waiting for a VMM failed; the vhost-user-blk socket stops");
                break;
            }
        }
        let dev = match opener.open() {
            Ok(d) => d,
            Err(why) => {
                warn!(socket = %where_, %why, "a VMM connected but the device cannot be served; disconnecting it");
                let _ = listener.accept();
                continue;
            }
        };
        let backend = match BlkBackend::new(dev, opts) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                warn!(socket = %where_, error = %e, "could not set up the device");
                let _ = listener.accept();
                continue;
            }
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new("parallax-vhost-user-blk".into(), backend.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                warn!(socket = %where_, error = %e, "could not start the vhost-user daemon");
                let _ = listener.accept();
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            warn!(socket = %where_, error = %e, "a VMM's connection failed");
            continue;
        }
        info!(socket = %where_, "VMM connected");
        *current.lock() = Some(backend.clone());
        if stop.is_raised() {
            // The stop came while this VMM was connecting: serve nothing.
            backend.stop();
        }
        match daemon.wait() {
            Ok(()) => info!(socket = %where_, "VMM disconnected"),
            Err(e) => info!(socket = %where_, reason = %e, "VMM disconnected"),
        }
        *current.lock() = None;
        backend.stop();
        drop(daemon);
        drop(backend);
    }
}
