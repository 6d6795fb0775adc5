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
//! * [`sim`] — the simulated transport's backend half: grant memory in a sealed memfd,
//!   handshake and notifications over a Unix socket, for frontends in other processes.
//! * `xen` (feature `xen`) — the real transport: gntdev, evtchn and the xenstore handshake.
//!
//! The frontend side — a simulated `blkfront`, its workloads and the `blktap-sim-frontend`
//! binary — is test support and lives in the `blkfront-sim` crate.

#![deny(missing_docs)]

pub mod abi;
pub mod engine;
mod error;
pub mod event;
pub mod grant;
pub mod request;
pub mod ring;
pub mod server;
pub mod shm;
pub mod sim;
#[cfg(feature = "xen")]
pub mod xen;

pub use error::{Error, Result};
