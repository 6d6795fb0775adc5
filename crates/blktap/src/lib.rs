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
//! * [`front`] — a simulated frontend half of the ring, for tests and the example.
//!
//! The `blktap-sim-frontend` binary runs a simulated frontend in its own process (ring and
//! grant pages in a shared file, notifications over a Unix socket) for the cross-process test.
//!
//! Nothing here talks to a real hypervisor yet: grants and event channels are simulated.

#![deny(missing_docs)]

pub mod abi;
pub mod engine;
mod error;
pub mod front;
pub mod grant;
pub mod request;
pub mod ring;
pub mod shm;

pub use error::{Error, Result};
