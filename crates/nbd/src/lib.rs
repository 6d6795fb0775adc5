//! Server side of the NBD (Network Block Device) protocol.
//!
//! Serves any [`blockdev::BlockDevice`] to standard NBD clients (qemu, libnbd, the Linux
//! kernel, fio, ...). Supported: the fixed-newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`,
//! structured replies, extended headers (64-bit lengths), the `base:allocation` metadata
//! context, and the commands READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and
//! DISC, and TLS (`NBD_OPT_STARTTLS`, optionally required, optionally with client
//! certificates; see [`TlsSettings`]). Not supported: the old-style handshake.
//!
//! A daemon implements [`ExportProvider`] and either hands accepted streams to
//! [`serve_connection`] or lets a [`Server`] accept on a TCP or Unix listener:
//!
//! ```no_run
//! use std::sync::Arc;
//! use blockdev::{BlockDevice, MemDisk};
//! use nbd::{ExportInfo, ExportProvider, Limits, OpenError, Server};
//!
//! struct OneDisk(Arc<MemDisk>);
//!
//! impl ExportProvider for OneDisk {
//!     fn list(&self) -> Vec<ExportInfo> {
//!         vec![ExportInfo::new("disk", "a test disk")]
//!     }
//!     fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
//!         match name {
//!             "disk" | "" => Ok(self.0.clone()),
//!             _ => Err(OpenError::Unknown(format!("no export named {name:?}"))),
//!         }
//!     }
//! }
//!
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809")?;
//! let provider = Arc::new(OneDisk(Arc::new(MemDisk::new(1 << 30))));
//! let server = Server::spawn_tcp(listener, provider, Limits::default())?;
//! // ... until the daemon is told to stop:
//! server.shutdown(); // stop accepting; connections finish their in-flight requests
//! server.wait();
//! # Ok::<(), std::io::Error>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffers;
mod error;
mod handshake;
mod poll;
mod room;
mod server;
mod stream;
mod tls;
mod transmission;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDevice;

pub use buffers::BufferPool;
pub use error::NbdError;
pub use poll::{DEFAULT_LONGEST as DEFAULT_POLL, InputPolling, MAX_LONGEST as MAX_POLL};
pub use server::Server;
pub use stream::{NbdStream, serve_connection, serve_connection_then};
pub use tls::{TlsSettings, TlsSetupError, TlsStream};

/// What the daemon tells the server about one export, for `NBD_OPT_LIST` and `NBD_OPT_INFO`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name the client uses to open the export.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA on one connection are visible on all
    /// connections to the same export. Off by default.
    pub multi_conn: bool,
}

impl ExportInfo {
    /// An export entry without multi-connection support.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        ExportInfo { name: name.into(), description: description.into(), multi_conn: false }
    }
}

/// Why an export could not be opened; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No export has this name (`NBD_REP_ERR_UNKNOWN`).
    Unknown(String),
    /// The export exists but may not be opened now, e.g. another client has it open for writing
    /// (`NBD_REP_ERR_POLICY`).
    Refused(String),
}

impl OpenError {
    /// The message for the client.
    pub fn message(&self) -> &str {
        match self {
            OpenError::Unknown(m) | OpenError::Refused(m) => m,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Unknown(m) => write!(f, "unknown export: {m}"),
            OpenError::Refused(m) => write!(f, "export refused: {m}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Supplies exports to the server; implemented by the daemon.
///
/// `open` is called once per `NBD_OPT_INFO`, `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`; the
/// returned device is dropped when the client is done with it (after `NBD_OPT_INFO`, or when
/// the connection ends), so an implementation can release a writer lock in `Drop`.
pub trait ExportProvider: Send + Sync {
    /// The exports to show for `NBD_OPT_LIST` (and where descriptions and flags are looked up).
    fn list(&self) -> Vec<ExportInfo>;

    /// Opens export `name`. The empty name means "the default export"; the provider decides
    /// whether there is one.
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, OpenError>;

    /// [`ExportProvider::open`] for a known client: the server passes how it reached the
    /// client (`tcp:ADDR:PORT`, or `unix:pid=PID,uid=UID`), for the provider's counters and
    /// logs. By default the client is ignored.
    fn open_for(&self, name: &str, client: &str) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let _ = client;
        self.open(name)
    }
}

/// Resource bounds for the server; every queue and buffer is bounded by these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sessions (connections past the handshake) a [`Server`] serves at once; a client that
    /// asks for an export beyond this is refused with a message (`NBD_REP_ERR_POLICY`). Idle
    /// VMs hold sessions legitimately, so this is large.
    pub max_connections: usize,
    /// Connections still in the handshake at once. When a new client finds them all taken, a
    /// handshake that has run for at least [`Limits::handshake_grace`] is dropped to make room:
    /// one of the client address (or Unix uid) with the most handshakes, the oldest of those.
    /// A client that connects and says nothing cannot lock others out, and one that floods
    /// pushes out its own. If none has had its grace, the new client is closed.
    pub max_handshakes: usize,
    /// How long a handshake is safe from being dropped for a newcomer.
    pub handshake_grace: Duration,
    /// Requests of one connection queued or executing at once.
    pub max_in_flight_per_conn: usize,
    /// Threads executing the requests of one connection.
    pub workers_per_conn: usize,
    /// WRITEs without FUA of at most this many bytes run in the thread that read them, when
    /// the device's writes land in memory ([`blockdev::BlockDevice::writes_land_in_memory`]):
    /// waking a worker for such a write costs more than the write (4 KiB random writes at
    /// queue depth 16 took about 18 µs of CPU each this way against 28 µs handed off). The
    /// reader reads the next request once the write is done. 0 hands every request to a worker.
    pub inline_write_max: u32,
    /// READs of at most this many bytes are first tried in the thread that read them, and
    /// served there when the device has the bytes without waiting
    /// ([`blockdev::BlockDevice::try_read_at`]: the page cache holds them and the metadata is
    /// cached); any other goes to a worker as before. A worker tries the same first for a READ
    /// of at most 1 MiB (one lookup for the chunk map and the bytes). 0 hands every READ to a
    /// worker and turns both attempts off.
    pub inline_read_max: u32,
    /// Largest READ or WRITE accepted (advertised as the maximum block size). Clamped to
    /// 64 KiB ..= 1 GiB.
    pub max_request_bytes: u32,
    /// Write payload bytes one connection may have read ahead of its replies (at least
    /// `max_request_bytes`).
    pub max_buffered_bytes_per_conn: u64,
    /// Payload bytes all connections together hold in memory (write data not yet written,
    /// read data not yet sent). Clones of one `Limits` share the pool, so every server given
    /// the same limits is bounded together.
    pub buffers: BufferPool,
    /// Time a client has to finish the handshake (at most [`MAX_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// A reply that cannot be sent for this long (client not reading) drops the connection
    /// (at most [`MAX_TIMEOUT`]).
    pub reply_timeout: Duration,
    /// How long a connection's reader polls for the client's next request before it blocks,
    /// and how many readers may poll at once ([`InputPolling`]). Clones share the count.
    pub polling: InputPolling,
    /// TLS, if the server offers it (not a bound, but set wherever the bounds are).
    pub tls: Option<TlsSettings>,
}

/// The longest handshake or reply timeout: a longer one (`Duration::MAX` for "never") is taken
/// as this, so deadlines stay representable.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_handshakes: 128,
            handshake_grace: Duration::from_secs(1),
            max_in_flight_per_conn: 64,
            workers_per_conn: 4,
            inline_write_max: 64 << 10,
            inline_read_max: 64 << 10,
            max_request_bytes: 32 << 20,
            max_buffered_bytes_per_conn: 64 << 20,
            buffers: BufferPool::default(),
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            polling: InputPolling::default(),
            tls: None,
        }
    }
}

impl Limits {
    /// The limits with every value forced into its sane range.
    pub(crate) fn normalized(&self) -> Limits {
        let max_request_bytes = self.max_request_bytes.clamp(64 << 10, 1 << 30);
        Limits {
            max_connections: self.max_connections.max(1),
            max_handshakes: self.max_handshakes.max(1),
            handshake_grace: self.handshake_grace,
            max_in_flight_per_conn: self.max_in_flight_per_conn.max(1),
            workers_per_conn: self.workers_per_conn.clamp(1, 256),
            inline_write_max: self.inline_write_max.min(max_request_bytes),
            inline_read_max: self.inline_read_max.min(max_request_bytes),
            max_request_bytes,
            max_buffered_bytes_per_conn: self.max_buffered_bytes_per_conn.max(u64::from(max_request_bytes)),
            buffers: self.buffers.clone(),
            handshake_timeout: self.handshake_timeout.clamp(Duration::from_millis(1), MAX_TIMEOUT),
            reply_timeout: self.reply_timeout.clamp(Duration::from_millis(1), MAX_TIMEOUT),
            polling: self.polling.clone(),
            tls: self.tls.clone(),
        }
    }
}
