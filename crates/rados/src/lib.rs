//! Parallax on Ceph RADOS: the block store's medium in a pool, held by a fenced lease.
//!
//! - [`client`]: a thin, safe binding of librados (loaded at run time: hosts without Ceph
//!   never need it).
//! - [`RadosBackend`]: the store's byte array cut into 4 MiB objects, behind the same
//!   [`blockstore::Backend`] a file store uses.
//! - [`lease`]: one writer at a time, and a writer that lost its lease fenced by blocklisting.
//! - [`open_store`]: `--store rados:POOL[/NAMESPACE]`.
//! - [`catalog`]: what the host serving a store publishes for the others (`vdi list`).
//!
//! `docs/format.md` describes the objects; `docs/design.md` the lease and fencing.

pub mod backend;
pub mod catalog;
pub mod client;
mod error;
mod ffi;
pub mod lease;
mod open;

pub use backend::RadosBackend;
pub use client::{CephOptions, Cluster, LockMode, LockSpec, Pool, PoolRoom};
pub use error::{RadosError, Result};
pub use lease::Lease;
pub use open::{
    RadosLocation, RadosMedium, RadosOptions, StoreStatus, control_key, local_host_name, open_medium, open_store,
    open_store_in_pool, served_elsewhere, store_status,
};
