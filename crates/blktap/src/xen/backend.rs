//! The blkif backend: finds the devices the toolstack created for us in xenstore and runs the
//! handshake of each ([`super::device`]). Nothing polls: the loop sleeps in `poll(2)` until a
//! xenstore watch fires (the backend root, and each device's frontend directory), a ring's
//! thread ends, or the stop signal is raised.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;

use blockdev::BlockDevice;

use super::connect::Connector;
use super::device::{Device, Shutdown};
use super::keys::{backend_root, number};
use super::ring_thread::Rings;
use super::store::XenStore;
use super::wakeup::Wakeup;
use crate::abi::Abi;
use crate::server::ServerOptions;
use crate::{Error, Result};

/// Opens the disk named by a device's `params` (without the `parallax:` prefix).
pub trait DiskOpener: Send + Sync {
    /// The disk for `target` (a VDI name or id), or why it cannot be served.
    fn open(&self, target: &str) -> std::result::Result<Arc<dyn BlockDevice>, String>;
}

impl<F> DiskOpener for F
where
    F: Fn(&str) -> std::result::Result<Arc<dyn BlockDevice>, String> + Send + Sync,
{
    fn open(&self, target: &str) -> std::result::Result<Arc<dyn BlockDevice>, String> {
        self(target)
    }
}

/// How the backend runs.
#[derive(Debug, Clone)]
pub struct XenBackendOptions {
    /// Our domain id (0 in dom0; a driver domain's id otherwise).
    pub backend_domid: u32,
    /// How each ring is served.
    pub server: ServerOptions,
    /// The most queues a frontend may use per device (`multi-queue-max-queues`), each its
    /// own ring, thread and worker pool; clamped to 1..=[`super::keys::MAX_QUEUES`]. By default
    /// the CPUs we may run on, as Linux's blkback offers its online CPUs.
    pub max_queues: u32,
}

impl Default for XenBackendOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            backend_domid: 0,
            server: ServerOptions::default(),
            max_queues: u32::try_from(cpus).unwrap_or(u32::MAX).clamp(1, super::keys::MAX_QUEUES),
        }
    }
}

/// Something that happened to a device, for the caller's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// The disk was opened and the features published (state InitWait).
    Opened {
        /// The backend directory.
        device: String,
        /// The disk opened.
        target: String,
    },
    /// The frontend's rings are served (state Connected).
    Connected {
        /// The backend directory.
        device: String,
        /// Pages of each ring.
        ring_pages: usize,
        /// Queues (rings) the frontend uses.
        queues: usize,
        /// The ABI of the ring.
        protocol: Abi,
    },
    /// The device was closed and its disk released (state Closed).
    Closed {
        /// The backend directory.
        device: String,
        /// Why.
        reason: String,
    },
    /// The device failed; the error is also published in xenstore.
    Failed {
        /// The backend directory.
        device: String,
        /// What went wrong.
        error: String,
    },
    /// The rings an earlier backend left connected are served again from where they stopped.
    Resumed {
        /// The backend directory.
        device: String,
        /// The index each queue's ring resumed at, in queue order.
        indices: Vec<u32>,
        /// Requests the guest queued while no backend ran (all queues).
        waiting: u32,
    },
    /// At shutdown: the rings were drained and left connected for the next backend.
    Detached {
        /// The backend directory.
        device: String,
        /// The index each queue's ring is to be resumed at, in queue order.
        indices: Vec<u32>,
    },
    /// The device's directory disappeared; its ring (if any) is stopped.
    Removed {
        /// The backend directory.
        device: String,
    },
}

impl fmt::Display for BackendEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Opened { device, target } => write!(f, "{device}: opened {target}, waiting for the frontend"),
            Self::Connected { device, ring_pages, queues: 1, protocol } => {
                write!(f, "{device}: connected ({ring_pages}-page ring, {protocol:?})")
            }
            Self::Connected { device, ring_pages, queues, protocol } => {
                write!(f, "{device}: connected ({queues} queues, {ring_pages}-page rings, {protocol:?})")
            }
            Self::Closed { device, reason } => write!(f, "{device}: closed ({reason})"),
            Self::Failed { device, error } => write!(f, "{device}: failed: {error}"),
            Self::Removed { device } => write!(f, "{device}: removed"),
            Self::Resumed { device, indices, waiting } => write!(
                f,
                "{device}: resumed the ring an earlier backend left connected, at {}, {waiting} request(s) waiting",
                describe_indices(indices)
            ),
            Self::Detached { device, indices } => write!(
                f,
                "{device}: detached, ring left connected at {} for the next backend",
                describe_indices(indices)
            ),
        }
    }
}

/// `index 7`, or `indices 7/9 (2 queues)`.
fn describe_indices(indices: &[u32]) -> String {
    match indices {
        [one] => format!("index {one}"),
        many => {
            let all: Vec<String> = many.iter().map(u32::to_string).collect();
            format!("indices {} ({} queues)", all.join("/"), many.len())
        }
    }
}

/// What one scan of the backend root found.
#[derive(Debug, Default)]
struct Scan {
    /// The devices: `(frontend domid, devid)` pairs.
    devices: BTreeSet<(u32, u32)>,
    /// Frontend domains whose directory could not be listed this time: their devices are
    /// neither added nor removed.
    unreadable: BTreeSet<u32>,
}

/// The devices below the backend root. Names that are not numbers are not devices and are
/// skipped; a frontend directory that cannot be listed affects only its own devices. Errors
/// only if the root itself cannot be listed.
fn scan(store: &impl XenStore, root: &str) -> Result<Scan> {
    let mut found = Scan::default();
    for front in store.directory(root)? {
        let Some(domid) = number::<u32>(&front) else { continue };
        match store.directory(&format!("{root}/{front}")) {
            Ok(devs) => found.devices.extend(devs.iter().filter_map(|d| number::<u32>(d)).map(|devid| (domid, devid))),
            Err(_) => {
                found.unreadable.insert(domid);
            }
        }
    }
    Ok(found)
}

/// Runs the backend until `stop` is raised: serves every blkif device the toolstack creates
/// under `/local/domain/<backend_domid>/backend/vbd`. Problems of one device are published in
/// its directory and reported to `observe`; they never affect other devices. Errors only if
/// xenstore itself cannot be read. On return every ring is stopped: a connected one is left
/// connected for the next backend to resume (see `device`), any other device is Closed.
pub fn run<S: XenStore, C: Connector>(
    store: &S,
    connector: &C,
    opener: Arc<dyn DiskOpener>,
    opts: &XenBackendOptions,
    stop: &shutdown::Shutdown,
    observe: &mut dyn FnMut(&BackendEvent),
) -> Result<()> {
    let root = backend_root(opts.backend_domid);
    let ring_ended = Wakeup::new()?;
    store.watch(&root)?;
    let mut watched: BTreeSet<String> = BTreeSet::new();
    let mut devices: BTreeMap<(u32, u32), Device> = BTreeMap::new();
    let mut draining: Vec<Rings> = Vec::new();
    let result = loop {
        if stop.is_raised() {
            break Ok(());
        }
        // Lowered before looking, so whatever happens while we look wakes the next wait.
        ring_ended.clear();
        let _ = store.take_events();
        let present = match scan(store, &root) {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        devices.retain(|key, dev| {
            if present.devices.contains(key) || present.unreadable.contains(&key.0) {
                return true;
            }
            draining.extend(dev.take_rings());
            observe(&BackendEvent::Removed { device: dev.dir().to_string() });
            false
        });
        for &(domid, devid) in &present.devices {
            if let std::collections::btree_map::Entry::Vacant(slot) = devices.entry((domid, devid)) {
                let dir = format!("{root}/{domid}/{devid}");
                slot.insert(Device::discover(store, dir, domid, devid, opener.as_ref(), opts, observe));
            }
        }
        for dev in devices.values_mut() {
            dev.step(store, connector, opener.as_ref(), opts, &ring_ended, observe);
        }
        watch_frontends(store, &devices, &mut watched);
        let mut still = Vec::new();
        for rings in draining.drain(..) {
            if rings.all_finished() {
                let _ = rings.join();
            } else {
                still.push(rings);
            }
        }
        draining = still;
        if let Err(e) = wait_for_news(stop, store, &ring_ended) {
            break Err(e);
        }
    };
    for path in watched {
        let _ = store.unwatch(&path);
    }
    let _ = store.unwatch(&root);
    devices.values().for_each(Device::request_stop);
    for (_, dev) in std::mem::take(&mut devices) {
        let device = dev.dir().to_string();
        match dev.shutdown(store) {
            Shutdown::Detached { indices } => observe(&BackendEvent::Detached { device, indices }),
            Shutdown::Closed | Shutdown::Untouched => {}
        }
    }
    for rings in draining {
        let _ = rings.join();
    }
    result
}

/// Watches the frontend state of every device (its changes drive the handshake),
/// and stops watching those of devices that are gone. A watch xenstored refuses affects only
/// its device: it is asked for again at the next pass.
fn watch_frontends(store: &impl XenStore, devices: &BTreeMap<(u32, u32), Device>, watched: &mut BTreeSet<String>) {
    let wanted: BTreeSet<String> = devices.values().filter_map(Device::frontend_state).collect();
    for path in watched.difference(&wanted) {
        let _ = store.unwatch(path);
    }
    watched.retain(|p| wanted.contains(p));
    for path in wanted {
        if !watched.contains(&path) && store.watch(&path).is_ok() {
            watched.insert(path);
        }
    }
}

/// Sleeps until a xenstore watch fired, a ring's thread ended, or `stop` was raised.
fn wait_for_news(stop: &shutdown::Shutdown, store: &impl XenStore, ring_ended: &Wakeup) -> Result<()> {
    let mut fds = [
        PollFd::from_borrowed_fd(stop.fd(), PollFlags::IN),
        PollFd::from_borrowed_fd(store.events(), PollFlags::IN),
        PollFd::from_borrowed_fd(ring_ended.as_fd(), PollFlags::IN),
    ];
    loop {
        match poll(&mut fds, None) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}
