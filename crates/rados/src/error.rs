//! The crate's one error type.

use std::io;

/// What can go wrong talking to RADOS.
#[derive(Debug, thiserror::Error)]
pub enum RadosError {
    /// librados could not be loaded (Debian: `apt install librados2`).
    #[error("librados is not available ({0}); install librados2 (Debian: apt install librados2)")]
    Unavailable(String),
    /// A librados call failed.
    #[error("{op}: {source}")]
    Call {
        /// What was being done.
        op: String,
        /// The errno librados returned.
        #[source]
        source: io::Error,
    },
    /// A name given to RADOS (pool, namespace, object, id) holds a NUL byte.
    #[error("{what} {name:?} contains a NUL byte")]
    BadName {
        /// What the name is of.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A `rados:POOL[/NAMESPACE]` store location that does not parse.
    #[error("bad RADOS store location {0:?}: expected rados:POOL or rados:POOL/NAMESPACE")]
    BadLocation(String),
    /// The store is held by another client's lease.
    #[error("the store is in use: {holder}")]
    Locked {
        /// Who holds it, as its lease says.
        holder: String,
    },
    /// This process no longer holds the store's lease: it was not renewed in time, or another
    /// host took the store over. Nothing more is written.
    #[error("the store's lease was lost ({0}); nothing more is written")]
    LeaseLost(String),
    /// A lease shorter than [`crate::lease::MIN_LEASE`] was asked for.
    #[error("a lease of {0:?} is too short: it must be at least 3 s (it is renewed every third of it)")]
    LeaseTooShort(std::time::Duration),
    /// What the store's header object records does not parse.
    #[error("the store's header object is damaged: {0}")]
    BadHeader(String),
    /// A monitor's or manager's answer to a command is not the JSON it documents.
    #[error("the cluster's answer does not parse: {0}")]
    BadReply(String),
    /// The cluster has no usage figures for a pool: the manager has not reported it yet.
    #[error("the cluster has no usage figures for pool {0:?} yet (a pool created moments ago)")]
    NoPoolFigures(String),
    /// No ceph-mgr is active: usage figures come from it.
    #[error("no ceph-mgr is active in the cluster, and pool usage figures come from it")]
    NoManager,
    /// The store's catalog object (what its serving host publishes) does not parse.
    #[error("the store's catalog is unreadable: {0}")]
    BadCatalog(String),
}

impl RadosError {
    /// A failed call: `ret` is librados' negative errno.
    pub(crate) fn call(op: impl Into<String>, ret: i64) -> Self {
        RadosError::Call { op: op.into(), source: io::Error::from_raw_os_error((-ret) as i32) }
    }

    /// The errno of a failed call, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RadosError::Call { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// As an `io::Error` for the block store: a full pool keeps its bare errno (the store turns
    /// `ENOSPC`/`EDQUOT` into "no space"), any other failed call keeps its kind and message.
    pub fn into_io(self) -> io::Error {
        match self {
            RadosError::Call { op, source } => match source.raw_os_error() {
                Some(code @ (libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => io::Error::from_raw_os_error(code),
                _ => io::Error::new(source.kind(), format!("{op}: {source}")),
            },
            other => io::Error::other(other),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = RadosError> = std::result::Result<T, E>;
