//! The block store's error type.

use crate::BlockAddr;

/// Everything that can go wrong in the block store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O call on the backing file or device failed.
    #[error("I/O error while {op}: {source}")]
    Io {
        /// What the store was doing.
        op: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// No free block is left (the device is full or the store reached its size limit).
    #[error("the block store is full: no free block left ({detail})")]
    NoSpace {
        /// Why no block could be had.
        detail: String,
    },
    /// The file is not a Parallax store (bad magic in both superblock copies).
    #[error("not a Parallax block store: {0}")]
    NotAStore(String),
    /// The store was written by a format version this code does not read.
    #[error("unsupported store format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found on disk.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// A metadata block failed its checks.
    #[error("damaged {kind} block {addr}: {reason}")]
    Corrupt {
        /// What the block should be (e.g. "radix node").
        kind: &'static str,
        /// Where it is.
        addr: BlockAddr,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's structure is inconsistent outside any single block.
    #[error("store damaged: {0}")]
    Damaged(String),
    /// A block address outside the store was used.
    #[error("block {0} is outside the store")]
    OutOfRange(BlockAddr),
    /// One transaction changed more metadata than a journal slot holds.
    #[error(
        "transaction too large: {blocks} metadata blocks changed but a journal slot holds {capacity}; commit more often or create the store with a larger journal"
    )]
    TransactionTooLarge {
        /// Blocks the transaction needs.
        blocks: usize,
        /// Blocks a journal slot holds.
        capacity: usize,
    },
    /// The store is locked by another process.
    #[error("the store {path} is in use by another process ({detail})")]
    Locked {
        /// The store's path.
        path: String,
        /// Which lock was wanted.
        detail: String,
    },
    /// The store was opened read-only.
    #[error("the store is open read-only")]
    ReadOnly,
    /// A metadata block was needed that is not in memory, while the caller asked not to read
    /// the medium under the metadata lock; [`crate::BlockStore::with_cached`] and
    /// [`crate::BlockStore::with_transaction`] read it without the lock and retry.
    #[error("metadata block {addr} ({}) is not in memory", meta_kind.name)]
    NotCached {
        /// The block.
        addr: BlockAddr,
        /// What kind of block it is (how to verify it when it is read).
        meta_kind: &'static crate::MetaKind,
        /// The store's commit epoch when the block was missed: given back to
        /// [`crate::BlockStore::load`], it tells whether the walk that missed may be stale.
        epoch: u64,
    },
    /// Metadata was changed outside a [`crate::Transaction`] (a bug in the caller).
    #[error("metadata changed outside a transaction")]
    NoTransaction,
    /// A [`crate::FrozenView`] was given up while open: the store changed more than it may keep
    /// (by default 32 Ki metadata blocks changed, or 256 Ki blocks freed), or the space it held
    /// was needed for a write.
    #[error(
        "the store changed too much while it was being checked (the check was given up to keep it running); run the check again when the store is quieter"
    )]
    ViewOverrun,
    /// An earlier commit failed; the in-memory state can no longer be trusted.
    #[error("an earlier commit failed; reopen the store to recover from the journal")]
    Poisoned,
}

impl StoreError {
    /// An I/O error with what the store was doing.
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { op: op.into(), source }
    }
}

/// Result type of the block store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
