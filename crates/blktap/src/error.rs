//! The crate's one error type.

/// What went wrong in the blkif transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The frontend published a request producer index that cannot be right: more requests
    /// outstanding than the ring holds. The ring must be treated as broken.
    #[error("broken ring: req_prod {req_prod} with {rsp_prod} responses produced exceeds ring size {size}")]
    BrokenRing {
        /// The producer index read from shared memory.
        req_prod: u32,
        /// Our private response producer index.
        rsp_prod: u32,
        /// Number of slots in the ring.
        size: u32,
    },
    /// A response was pushed without a consumed request to answer.
    #[error("no request is waiting for a response")]
    NoOutstandingRequest,
    /// An access reaches outside a shared memory region.
    #[error("access {offset}+{len} outside shared region of {region} bytes")]
    OutOfBounds {
        /// First byte of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        region: usize,
    },
    /// A write to a region mapped read-only.
    #[error("the shared region is mapped read-only")]
    ReadOnlyRegion,
    /// A shared region has the wrong size for its use.
    #[error("bad shared region size {0} bytes")]
    BadRegionSize(usize),
    /// A grant reference is not known to the grant table.
    #[error("unknown grant reference {0}")]
    BadGrant(u32),
    /// A grant was used for a kind of access it does not allow.
    #[error("grant reference {0} does not allow this access")]
    GrantAccess(u32),
    /// A message from the peer process does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer closed its end of the connection.
    #[error("the peer went away")]
    PeerGone,
    /// The backend refused to attach the disk.
    #[error("refused by the backend: {0}")]
    Refused(String),
    /// The disk failed a flush the guest cannot be told about without being misled (an
    /// empty flush: Linux blkfront takes its error as "flushes unsupported" and never flushes
    /// again). The ring is stopped and the device failed instead, so the guest sees its disk
    /// go away rather than lose durability silently.
    #[error("the disk failed a flush, so the device is failed: {0}")]
    FlushFailed(String),
    /// An operating-system call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result of a blkif transport operation.
pub type Result<T> = std::result::Result<T, Error>;
