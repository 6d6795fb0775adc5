//! The Parallax block store: one file or device holding every VDI of a host.
//!
//! - Space is cut into 4 KiB blocks named by [`BlockAddr`].
//! - Every allocatable block has a reference count; a block is free at zero and is only handed
//!   out again after the commit that freed it is durable.
//! - Metadata blocks (radix nodes, the VDI registry, reference counts) are changed in memory, in
//!   a [`Transaction`] that rolls back only its own changes, and made durable together by
//!   [`BlockStore::commit`] through a two-slot journal: a power cut at any instant — unsynced
//!   writes lost, reordered or torn — leaves the store exactly as of the last completed commit.
//! - Data blocks are written in place with [`BlockStore::write_data`].
//!
//! `docs/format.md` in the repository describes the format byte by byte.

/// A pause point for deterministic race tests (`fail::fail_point!`); compiled out unless the
/// `failpoints` feature is on, as it is only for the test-support crate's tests.
macro_rules! test_point {
    ($($args:tt)*) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($($args)*);
    };
}

mod addr;
pub mod backend;
mod error;
pub mod format;
mod io_epoch;
mod journal;
mod meta;
mod store;
mod superblock;
mod view;

pub use addr::{BLOCK_SIZE, Block, BlockAddr};
pub use backend::{Backend, CrashMode, FaultyBackend, FileBackend, MediumRoom, MemBackend};
pub use error::{Result, StoreError};
pub use io_epoch::IoGuard;
pub use meta::{DerivedState, Meta, MetaKind, REFCOUNT_KIND, SpaceStats};
pub use store::{
    BlockStore, CommitInfo, CreateOptions, MISS_RETRIES, OpenOptions, Recovery, RoomSource, Transaction, is_blank,
};
pub use superblock::Superblock;
pub use view::{FrozenView, MetaRead};
