//! Parallax VDIs: the registry of virtual disks in a block store, their snapshot logs, clones,
//! import and export, and the consistency check.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use blockdev::BlockDevice;
//! use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};
//! let store = BlockStore::create(Arc::new(MemBackend::new()), &CreateOptions::default(), &OpenOptions::default())?;
//! let reg = vdi::Registry::open(Arc::new(store))?;
//! let id = reg.create_vdi("golden", Some(1 << 30))?;
//! reg.open_vdi(id, true)?.write_at(0, &[1; 4096], false)?;
//! let snap = reg.snapshot(id)?;
//! let clone = reg.clone_snapshot("vm-1", snap)?;
//! # Ok(()) }
//! ```

/// A pause or failure point for deterministic race tests (`fail::fail_point!`); compiled out
/// unless the `failpoints` feature is on, as it is only for the test-support crate's tests.
macro_rules! test_point {
    ($($args:tt)*) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($($args)*);
    };
}

mod check;
mod committer;
mod cow_locks;
mod diff_stream;
mod disk;
mod error;
mod fill;
mod ids;
mod import;
mod io;
mod io_stats;
mod reclaim;
mod registry;
mod scatter;
mod snap_names;
mod snap_table;
mod snapshot_ids;

pub use check::{CheckReport, Problem};
pub use committer::Committer;
pub use diff_stream::{DIFF_MAGIC, DIFF_VERSION, DiffStats};
pub use error::{Result, VdiError};
pub use fill::{Import, ImportDevice};
pub use ids::{SnapshotId, VdiId};
pub use import::{Comparison, ExportStats, ImportStats};
pub use io::{SnapshotDisk, VdiDisk};
pub use io_stats::{HandleReport, IoOp, IoSnapshot, LATENCY_BOUNDS_US, UNNAMED_CLIENT, VdiIoReport};
pub use reclaim::{ReclaimStats, Reclaimer};
pub use registry::{Durability, MAX_VDI_SIZE, Registry, SnapshotInfo, Source, VdiInfo};

/// Snapshots one log block holds: deleting all of a full block's snapshots frees it.
pub const SNAPSHOTS_PER_LOG_BLOCK: usize = disk::SNAPLOG_SLOTS;
