//! Serving VDIs to simulated Xen guests over the blkif shared ring.
//!
//! Each guest (a `blkfront` process) connects to the ring socket, names a VDI and hands over
//! its grant memory (see `blktap::sim`). Every accepted ring is served on its own thread with
//! its own worker pool, so a slow VDI only slows its own guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use blktap::engine::Engine;
use blktap::server::{RingServer, ServerOptions};
use blktap::sim::{DiskInfo, SimListener, SimPending};
use shutdown::Shutdown;

use crate::exports::VdiExports;

/// Most rings served at once; further guests are refused with a message.
pub const MAX_RINGS: usize = 256;
/// Most connections still in their handshake (each has at most 5 s); more are closed at once.
pub const MAX_HANDSHAKES: usize = 32;

/// The ring listener and the threads of its guests.
pub struct RingService {
    accept: JoinHandle<()>,
    path: PathBuf,
}

impl RingService {
    /// Listens on `path` and serves guests until `stop` is raised.
    pub fn spawn(path: &Path, exports: Arc<VdiExports>, workers: usize, stop: Shutdown) -> Result<Self> {
        let listener = SimListener::bind(path).with_context(|| format!("listening for rings on {}", path.display()))?;
        let options = ServerOptions { workers };
        let accept = std::thread::Builder::new()
            .name("ring-accept".into())
            .spawn(move || accept_loop(listener, exports, options, stop))?;
        Ok(Self { accept, path: path.to_path_buf() })
    }

    /// Waits until every ring has answered the requests it took (after `stop` was raised).
    pub fn wait(self) {
        let _ = self.accept.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts guests until `stop` is raised, waiting on the socket and the signal together.
fn accept_loop(listener: SimListener, exports: Arc<VdiExports>, options: ServerOptions, stop: Shutdown) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut guests: Vec<JoinHandle<()>> = Vec::new();
    while !stop.is_raised() {
        guests.retain(|g| !g.is_finished());
        let stream = match listener.accept_until(&stop) {
            Ok(Some(_)) if guests.len() >= MAX_RINGS + MAX_HANDSHAKES => {
                tracing::warn!("ring socket: {} connections open; closing a new one", guests.len());
                continue;
            }
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("ring socket: {e}");
                // E.g. out of descriptors: back off (a stop ends the wait) rather than spin.
                stop.wait_timeout(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let (exports, options, stop, active) = (exports.clone(), options.clone(), stop.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("ring".into()).spawn(move || {
            serve_guest(stream, &exports, options, &stop, &active);
        });
        match spawned {
            Ok(h) => guests.push(h),
            Err(e) => tracing::error!("cannot start a ring thread: {e}"),
        }
    }
    for g in guests {
        let _ = g.join();
    }
}

/// Decrements the ring count when a guest's thread ends, however it ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_guest(
    stream: std::os::unix::net::UnixStream,
    exports: &VdiExports,
    options: ServerOptions,
    stop: &Shutdown,
    active: &AtomicUsize,
) {
    let pending = match SimPending::read(stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("ring handshake failed: {e}");
            return;
        }
    };
    let _slot = Slot(active);
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_RINGS {
        pending.reject(&format!("the daemon already serves {MAX_RINGS} rings"));
        return;
    }
    let vdi = pending.attach().vdi.clone();
    let dev = match exports.open_device_for(&vdi, "blkif ring (simulated guest)") {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(vdi, "ring refused: {}", e.message());
            pending.reject(e.message());
            return;
        }
    };
    let info = DiskInfo::new(dev.size(), dev.read_only());
    let abi = pending.attach().protocol;
    let backend = match pending.accept(&info) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(vdi, "ring refused: {e}");
            return;
        }
    };
    tracing::info!(vdi, ?abi, slots = backend.ring.size(), "ring connected");
    let server = RingServer::new(backend.ring, Engine::new(dev, backend.grants), backend.events, options);
    let stats = server.stats();
    match server.run(stop) {
        Ok(ended) => tracing::info!(
            vdi,
            ?ended,
            requests = stats.requests.load(Ordering::Relaxed),
            failed = stats.failed.load(Ordering::Relaxed),
            notifications = stats.notifications.load(Ordering::Relaxed),
            "ring closed"
        ),
        Err(e) => tracing::error!(vdi, "ring disconnected: {e}"),
    }
}
