//! The real-Xen transport (feature `xen`): grant mapping through `/dev/xen/gntdev`, event
//! channels through `/dev/xen/evtchn`, and the backend half of the xenstore handshake.
//!
//! * [`ioctl`] — the `_IOC` request encoding of the Xen devices.
//! * [`gntdev`] — [`XenGrantTable`]: the frontend's granted pages.
//! * [`evtchn`] — [`XenEventChannel`]: notifications to and from the frontend.
//! * [`store`] — [`XenStore`]: xenstore access with watches (the real one, or [`MemStore`]).
//! * [`wire`] — [`XsClient`]: our client of xenstored's wire protocol, with watches and
//!   transactions.
//! * `wakeup` — an eventfd signal the backend polls beside xenstore's.
//! * [`keys`] — the xenstore keys of a blkif device, parsed and checked.
//! * [`connect`] — [`Connector`]: turning the frontend's ring keys into a served ring.
//! * `device`, `ring_thread`, `readonly` — one device's state machine, its ring thread, and a
//!   read-only view of a disk.
//! * [`backend`] — [`run`]: the event loop over all devices.
//!
//! The handshake is tested against [`MemStore`] with simulated grants and event channels
//! (`tests/xen.rs`), and against Xen 4.17 itself by `cargo xtask xen-demo`; see `docs/xen.md`.

pub mod backend;
pub mod connect;
mod device;
pub mod evtchn;
pub mod gntdev;
pub mod ioctl;
pub mod keys;
mod readonly;
mod ring_thread;
pub mod store;
mod wakeup;
pub mod wire;

use std::sync::Arc;

pub use backend::{BackendEvent, DiskOpener, XenBackendOptions, run};
pub use connect::{Connection, Connector, RingSpec, XenConnector};
pub use device::DETACHED_KEY;
pub use evtchn::XenEventChannel;
pub use gntdev::XenGrantTable;
pub use store::{MemStore, XenStore};
pub use wire::XsClient;

use crate::Result;

/// Runs the backend in dom0 (or a driver domain) against the real xenstore (the
/// `$XENSTORED_PATH` socket, `/run/xenstored/socket`, or the xenbus device), `/dev/xen/gntdev`
/// and `/dev/xen/evtchn`, until `stop` is raised.
pub fn run_dom0(
    opener: Arc<dyn DiskOpener>,
    opts: &XenBackendOptions,
    stop: &shutdown::Shutdown,
    observe: &mut dyn FnMut(&BackendEvent),
) -> Result<()> {
    let store = XsClient::open()?;
    run(&store, &XenConnector, opener, opts, stop, observe)
}
