//! The VDI layer's error type.

use blockstore::StoreError;

use crate::{SnapshotId, VdiId};

/// Everything that can go wrong in the VDI layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VdiError {
    /// The block store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No VDI has that id or name (the text as given).
    #[error("{}", unknown_vdi(.0))]
    UnknownVdi(String),
    /// No live snapshot has that id.
    #[error("no snapshot {0} (see `vdi snap-list VDI`)")]
    UnknownSnapshot(SnapshotId),
    /// The snapshot was deleted.
    #[error("snapshot {0} was deleted")]
    SnapshotDeleted(SnapshotId),
    /// A VDI already has that name.
    #[error("a VDI named '{0}' already exists; choose another name or delete it first")]
    NameTaken(String),
    /// The name cannot be a VDI's name.
    #[error("invalid VDI name '{}': {why}", name.escape_debug())]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An image is larger than the VDI.
    #[error("the image is {image} bytes but VDI {vdi} is only {size} bytes; create a larger VDI")]
    ImageTooLarge {
        /// The VDI.
        vdi: VdiId,
        /// Its size.
        size: u64,
        /// The image's size.
        image: u64,
    },
    /// The name cannot be a snapshot's name.
    #[error("invalid snapshot name '{}': {why}", name.escape_debug())]
    BadSnapshotName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Another live snapshot of the VDI has that name.
    #[error("VDI {vdi} already has a snapshot named '{name}' (snapshot {other})")]
    SnapshotNameTaken {
        /// The VDI.
        vdi: VdiId,
        /// The name.
        name: String,
        /// The snapshot that has it.
        other: SnapshotId,
    },
    /// No live snapshot of the VDI has that name.
    #[error("VDI {vdi} has no snapshot named '{name}' (see `vdi snap-list {vdi}`)")]
    UnknownSnapshotName {
        /// The VDI.
        vdi: VdiId,
        /// The name.
        name: String,
    },
    /// The snapshot is protected.
    #[error("snapshot {0} is protected; `vdi snap-unprotect` it first")]
    Protected(SnapshotId),
    /// A snapshot of another VDI was given.
    #[error("snapshot {snapshot} is a snapshot of VDI {owner}, not of VDI {vdi}")]
    NotItsSnapshot {
        /// The VDI named.
        vdi: VdiId,
        /// The snapshot named.
        snapshot: SnapshotId,
        /// The VDI it belongs to.
        owner: VdiId,
    },
    /// A resize would drop data and was not allowed to.
    #[error("VDI {vdi} is {size} bytes; shrinking it to {wanted} drops everything past that: add --allow-shrink")]
    ShrinkRefused {
        /// The VDI.
        vdi: VdiId,
        /// Its size.
        size: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// A diff stream is malformed, damaged or does not fit the VDI.
    #[error("bad diff stream: {0}")]
    BadDiff(String),
    /// An incremental diff was asked from a snapshot without a name.
    #[error(
        "snapshot {0} has no name: an incremental diff names its base so it applies only on top of it; \
         name it first (`vdi snap-rename @{0} NAME`), on both stores"
    )]
    UnnamedBase(SnapshotId),
    /// A size is out of range.
    #[error("invalid size {0}: a VDI holds 1 byte to 256 TiB, in whole 512-byte sectors")]
    BadSize(u64),
    /// The VDI or snapshot is in use (open for I/O) and cannot be deleted now.
    #[error("{0} is in use by a running export; stop using it first")]
    InUse(String),
    /// Another writer has the VDI open.
    #[error("VDI {0} is already open for writing")]
    Busy(VdiId),
    /// The VDI has no size yet (created without --size and never filled).
    #[error("VDI {0} has no size yet: fill it from an image or create it with a size")]
    NoSize(VdiId),
    /// An I/O error on a file outside the store (an image being imported, say).
    #[error("{op}: {source}")]
    File {
        /// What was being done, with the path.
        op: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The registry's structure is damaged.
    #[error("registry damaged: {0}")]
    Damaged(String),
}

/// Result type of the VDI layer.
pub type Result<T, E = VdiError> = std::result::Result<T, E>;

impl VdiError {
    /// True for a full store, for callers that map errors to ENOSPC.
    pub fn is_no_space(&self) -> bool {
        matches!(self, VdiError::Store(StoreError::NoSpace { .. }))
    }
}

impl From<VdiError> for blockdev::DevError {
    fn from(e: VdiError) -> Self {
        match e {
            VdiError::Store(StoreError::NoSpace { .. }) => blockdev::DevError::NoSpace,
            VdiError::Store(StoreError::ReadOnly) => blockdev::DevError::ReadOnly,
            other => blockdev::DevError::Io(other.to_string()),
        }
    }
}

/// Says why `text` names no VDI: a snapshot reference given where a VDI is wanted, an id no VDI
/// has, or a name no VDI has.
fn unknown_vdi(text: &str) -> String {
    if let Some((_, snap)) = text.split_once('@') {
        return format!(
            "'{text}' names snapshot {snap}, not a VDI: give a VDI by name or id (see `vdi list`; snapshots: `vdi snap-list VDI`)"
        );
    }
    if text.parse::<VdiId>().is_ok() {
        return format!("no VDI with id {text} (see `vdi list`)");
    }
    format!("no VDI named '{text}' (see `vdi list`)")
}
