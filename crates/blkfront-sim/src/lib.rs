//! Simulated Xen block frontends (test support; not shipped).
//!
//! The `blktap` crate is the backend: the blkif ABI, the ring server and the transports. This
//! crate is the other side, standing in for a guest's Linux `blkfront` in tests, benchmarks and
//! `cargo xtask ring-*` runs:
//!
//! * [`front`] — the frontend half of the shared ring (ring.h's `FRONT_RING_*` macros).
//! * [`connect`] — [`SimFrontend`]: grant memory in a sealed memfd and the handshake with a
//!   backend's Unix socket (`blktap::sim`).
//! * [`guest`] — a simulated `blkfront`: operations to requests, many in flight.
//! * [`workload`] — the data patterns and verification model of the simulated guests.
//!
//! The `blktap-sim-frontend` binary is a simulated guest in its own process.
//!
//! Errors are the transport's own ([`blktap::Error`]): a frontend fails for the same reasons
//! the backend reports (a broken ring, a protocol error, a peer gone), so a second enum would
//! only rename them.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod connect;
pub mod front;
pub mod guest;
pub mod workload;

pub use blktap::{Error, Result};
pub use connect::{FrontendOptions, SimFrontend};
