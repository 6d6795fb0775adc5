//! The Xen blkif shared-ring transport: a backend that serves a [`blockdev::BlockDevice`] to a
//! Xen block frontend (`blkfront`) through the shared request/response ring of Xen's public
//! headers `io/ring.h` and `io/blkif.h`.
//!
//! The crate is split into small modules with one job each:
//!
//! * [`abi`] — the exact wire layout of the ring header, requests and responses, for the
//!   x86_64 ABI (served natively) and the 32-bit x86 ABI (decoded into the same requests).
//! * [`shm`] — the only `unsafe` code: bounds-checked atomic and volatile access to a shared
//!   memory region.
//! * [`request`] — decoding a request slot copied out of the ring into an ABI-neutral value.
//! * [`ring`] — the backend half of the shared ring (consume requests, publish responses,
//!   notification hold-off).
//! * [`grant`] — the grant-table abstraction and a simulated grant table over shared memory.
//! * [`engine`] — validation and dispatch of requests to a block device.
//! * [`event`] — event channels (the notifications between the two halves).
//! * [`server`] — serving one ring with many requests in flight on a worker pool.
//! * [`sim`] — the simulated transport: grant memory in a sealed memfd, handshake and
//!   notifications over a Unix socket, for frontends running as separate processes.
//! * [`front`] — the frontend half of the ring, for simulated guests.
//! * [`guest`] — a simulated `blkfront`: operations to requests, many in flight.
//! * [`workload`] — the data patterns and verification model of the simulated guests.
//!
//! * `xen` (feature `xen`) — the real transport: gntdev, evtchn and the xenstore handshake.
//!
//! The `blktap-sim-frontend` binary is a simulated guest (`blkfront`) in its own process.

#![deny(missing_docs)]

pub mod abi;
pub mod engine;
mod error;
pub mod event;
pub mod front;
pub mod grant;
pub mod guest;
pub mod request;
pub mod ring;
pub mod server;
pub mod shm;
pub mod sim;
pub mod workload;
#[cfg(feature = "xen")]
pub mod xen;

pub use error::{Error, Result};
