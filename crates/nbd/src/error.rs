//! The crate's error type.

use std::io;
use std::time::Duration;

/// Why a connection ended other than by the client's clean disconnect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// Reading from or writing to the peer failed (including an unexpected end of stream).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a wrong magic number; the stream cannot be resynchronised.
    #[error("bad magic {got:#x} from client (expected {expected:#x})")]
    BadMagic {
        /// The magic the protocol requires at this point.
        expected: u64,
        /// The value received.
        got: u64,
    },
    /// The client set handshake flags this server did not offer.
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` announced more data than the server accepts (it has no error
    /// reply, so the connection is closed; other options are answered `NBD_REP_ERR_TOO_BIG`).
    #[error("option {option} announces {len} bytes of data, more than the {max} allowed")]
    OptionTooLarge {
        /// The option number.
        option: u32,
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export the provider refused; the protocol allows no error
    /// reply there, so the connection is closed.
    #[error("export {name:?} refused: {message}")]
    ExportRefused {
        /// The export name the client asked for.
        name: String,
        /// The provider's reason.
        message: String,
    },
    /// The client did not finish the handshake in time.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// The TLS handshake failed (no or a wrong client certificate, no common cipher, ...).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The client broke the protocol in a way that leaves no sane reply.
    #[error("protocol violation: {0}")]
    Protocol(String),
}
