//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's settings and a TLS stream that, like a socket,
//! splits into a reading handle and writing handles used from different threads.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::NbdStream;

/// The server's TLS settings: its certificate and key, optionally the authority whose client
/// certificates are required, and whether clients must use TLS at all.
///
/// Without `required` a client may upgrade or not (the protocol's SELECTIVETLS, with every
/// export available both ways). With it, every option but `NBD_OPT_STARTTLS` and
/// `NBD_OPT_ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until the client upgrades
/// (FORCEDTLS), so no export name, listing or data crosses the network in clear text.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ServerConfig>,
    required: bool,
    client_auth: bool,
}

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read or parsed.
    #[error("reading {path}: {source}")]
    Pem {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A file held no certificate.
    #[error("{0}: no certificate in it")]
    NoCertificate(String),
    /// rustls refused the certificates or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client authority could not be used to check client certificates.
    #[error("client certificate authority: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = |source| TlsSetupError::Pem { path: path.display().to_string(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

impl TlsSettings {
    /// Settings from PEM files: the server's certificate chain and private key and, if given,
    /// the authority that must have signed every client's certificate (clients without one are
    /// refused during the TLS handshake).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        required: bool,
    ) -> Result<TlsSettings, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|source| TlsSetupError::Pem { path: key.display().to_string(), source })?;
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key)?;
        Ok(TlsSettings { config: Arc::new(config), required, client_auth: client_ca.is_some() })
    }

    /// Clients must upgrade to TLS before anything else.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Clients must present a certificate signed by the configured authority.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// Runs the server side of the TLS handshake on `sock`, which must end by `deadline`.
    pub(crate) fn accept<S: NbdStream>(&self, mut sock: S, deadline: Instant) -> io::Result<TlsStream<S>> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            sock.set_read_deadline(Some(left))?;
            sock.set_write_deadline(Some(left))?;
            conn.complete_io(&mut sock)?;
        }
        // Session tickets and the like, written before the first NBD byte.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        sock.set_write_deadline(None)?;
        Ok(TlsStream {
            sock,
            shared: Arc::new(Shared { conn: Mutex::new(conn), send: Mutex::new(()), write_timeout: Mutex::new(None) }),
            raw: Vec::new(),
            raw_start: 0,
            raw_end: 0,
        })
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings").field("required", &self.required).field("client_auth", &self.client_auth).finish()
    }
}

impl PartialEq for TlsSettings {
    /// The same settings object (certificates are not compared).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.required == other.required
    }
}

impl Eq for TlsSettings {}

/// The TLS session one connection's handles share.
struct Shared {
    /// The session: encrypting, decrypting. Never held across a blocking socket call, so the
    /// reader feeding it and a writer sending never wait on each other's peer.
    conn: Mutex<ServerConnection>,
    /// Held while ciphertext goes out, taken before `conn`: records reach the socket in the
    /// order they were made.
    send: Mutex<()>,
    /// The write timeout last set: it bounds all of one `write`'s ciphertext, not each send
    /// (which any progress would restart). Replies do not use it: [`NbdStream::send_by`]
    /// is given the reply's deadline.
    write_timeout: Mutex<Option<Duration>>,
}

/// A TLS session over a socket-like stream; clones are handles to the same session, one used
/// for reading and the others for writing, as with a socket.
pub struct TlsStream<S> {
    sock: S,
    shared: Arc<Shared>,
    /// Ciphertext read from the socket (the reading handle's buffer); `raw_start..raw_end` is
    /// not yet given to the session.
    raw: Vec<u8>,
    raw_start: usize,
    raw_end: usize,
}

/// Ciphertext read from the socket at once.
const RAW_READ: usize = 64 << 10;

impl<S: NbdStream> TlsStream<S> {
    /// Sends whatever the session has to send (made under `conn`, written under `send` only),
    /// within the write timeout.
    fn flush_records(&mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        let _send = shared.send.lock();
        let mut out = Vec::new();
        {
            let mut conn = self.shared.conn.lock();
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
        }
        let deadline = self.write_deadline();
        self.send_ciphertext(&out, deadline)
    }

    /// When a write begun now must be sent by, from the write timeout (`None`: no bound).
    fn write_deadline(&self) -> Option<Instant> {
        self.shared.write_timeout.lock().map(|w| Instant::now() + w)
    }

    /// Encrypts what the session takes of `buf` and sends all of it, by `deadline` if given
    /// (the whole ciphertext, not each send: a client taking a byte now and then cannot
    /// stretch it). Returns the plaintext bytes taken.
    fn encrypt_and_send(&mut self, buf: &[u8], deadline: Option<Instant>) -> io::Result<usize> {
        let shared = self.shared.clone();
        let _send = shared.send.lock();
        let (n, out) = {
            let mut conn = self.shared.conn.lock();
            let n = conn.writer().write(buf)?;
            let mut out = Vec::with_capacity(n + 64);
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            (n, out)
        };
        self.send_ciphertext(&out, deadline)?;
        Ok(n)
    }

    /// Writes ciphertext, failing with `TimedOut` if it is not all sent by `deadline`.
    fn send_ciphertext(&mut self, mut out: &[u8], deadline: Option<Instant>) -> io::Result<()> {
        while !out.is_empty() {
            let sent = match deadline {
                Some(deadline) => self.sock.send_by(out, deadline),
                None => self.sock.write(out),
            };
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<S: NbdStream> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let wants_write = {
                let mut conn = self.shared.conn.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // No plaintext: decrypt what was read before, a record or so at a time (the
                // session takes only so much undecrypted input at once).
                if self.raw_start < self.raw_end {
                    let mut pending = &self.raw[self.raw_start..self.raw_end];
                    let fed = conn.read_tls(&mut pending)?;
                    self.raw_start += fed;
                    conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if fed > 0 {
                        continue;
                    }
                }
                conn.wants_write()
            };
            if wants_write {
                self.flush_records()?;
            }
            // Nothing left to decrypt: wait for ciphertext without holding the session.
            self.raw.resize(RAW_READ, 0);
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                // Closed without a close_notify: NBD messages carry their own lengths, so a cut
                // is still seen as one (an incomplete request fails its read).
                return Ok(0);
            }
            (self.raw_start, self.raw_end) = (0, n);
        }
    }
}

impl<S: NbdStream> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = self.write_deadline();
        self.encrypt_and_send(buf, deadline)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl<S: NbdStream> NbdStream for TlsStream<S> {
    fn clone_stream(&self) -> io::Result<Self> {
        Ok(TlsStream {
            sock: self.sock.clone_stream()?,
            shared: self.shared.clone(),
            raw: Vec::new(),
            raw_start: 0,
            raw_end: 0,
        })
    }

    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_deadline(timeout)
    }

    fn send_by(&mut self, buf: &[u8], deadline: Instant) -> io::Result<usize> {
        self.encrypt_and_send(buf, Some(deadline))
    }

    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        *self.shared.write_timeout.lock() = timeout;
        self.sock.set_write_deadline(timeout)
    }

    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown_stream(how)
    }

    fn end_session(&mut self) -> io::Result<()> {
        self.shared.conn.lock().send_close_notify();
        self.flush_records()
    }
}
