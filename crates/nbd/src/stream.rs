//! One connection: splitting the stream, the handshake deadline, then transmission.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use tracing::debug;

use crate::poll::{InputPolling, Polled, Poller};
use crate::{ExportProvider, Limits, NbdError, handshake, transmission};

/// A socket-like byte stream that can be split into independent reading and writing handles.
///
/// Implemented for [`TcpStream`] and [`UnixStream`].
pub trait NbdStream: Read + Write + Send + Sized {
    /// Another handle to the same stream (like `TcpStream::try_clone`).
    fn clone_stream(&self) -> io::Result<Self>;
    /// Sets the timeout of blocking reads (`None`: wait forever).
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sets the timeout of blocking writes (`None`: wait forever).
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Shuts down one or both directions; wakes threads blocked on the stream.
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()>;
    /// Tells the peer the session ends cleanly, if the stream has a way to (TLS's
    /// `close_notify`); a plain socket has nothing to say.
    fn end_session(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// True if [`NbdStream::read_now`] can tell whether input has arrived; a stream that
    /// cannot (TLS, whose records may sit decrypted in its own buffer) is never polled.
    fn can_read_now(&self) -> bool {
        false
    }
    /// Reads what has already arrived without waiting for more: `None` if nothing has.
    fn read_now(&mut self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
    /// Writes some of `buf`, waiting until `deadline` at most for the peer to make room; fails
    /// with `TimedOut` if nothing could be written by then. [`DeadlineWriter`] gives every send
    /// the reply's own deadline, so it holds however the peer takes the bytes.
    ///
    /// The default arms the stream's write timeout with the time left and writes once, which
    /// bounds the wait only as well as that timeout bounds one `write`; the sockets here wait
    /// in `poll`.
    fn send_by(&mut self, buf: &[u8], deadline: Instant) -> io::Result<usize> {
        self.set_write_deadline(Some(time_left(deadline)?))?;
        self.write(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => timed_out(),
            _ => e,
        })
    }
}

/// The error of a send that found no room in its time.
fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the peer made no room for a send in time")
}

/// What is left until `deadline`; `TimedOut` if nothing is.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(timed_out()) } else { Ok(left) }
}

/// `send` that waits for room until `deadline` at most: the socket is asked not to block and
/// the wait is a `poll` for writability with the time left, so no part of the wait restarts
/// the clock (a blocking `send` on a Unix socket gets its whole send timeout again at every
/// wait for room, and a trickling peer could stretch one send without end).
fn send_by(socket: impl AsFd, buf: &[u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let left = time_left(deadline)?;
        match rustix::net::send(&socket, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::AGAIN | Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let left = Timespec::try_from(left).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut fds = [PollFd::new(&socket, PollFlags::OUT)];
        match rustix::event::poll(&mut fds, Some(&left)) {
            // Ready, timed out (the next round's `time_left` says so) or interrupted: try again.
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `recv` that does not wait: `None` if nothing has arrived (or a signal came first).
fn recv_now(socket: impl AsFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
    match rustix::net::recv(socket, buf, RecvFlags::DONTWAIT) {
        Ok((n, _)) => Some(Ok(n)),
        Err(Errno::AGAIN | Errno::INTR) => None,
        Err(e) => Some(Err(e.into())),
    }
}

impl NbdStream for TcpStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn send_by(&mut self, buf: &[u8], deadline: Instant) -> io::Result<usize> {
        send_by(&*self, buf, deadline)
    }
    fn can_read_now(&self) -> bool {
        true
    }
    fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        recv_now(&*self, buf)
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl NbdStream for UnixStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn send_by(&mut self, buf: &[u8], deadline: Instant) -> io::Result<usize> {
        send_by(&*self, buf, deadline)
    }
    fn can_read_now(&self) -> bool {
        true
    }
    fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        recv_now(&*self, buf)
    }
    fn set_read_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

/// Reads from the stream, failing with `TimedOut` once the deadline (if any) has passed.
/// Before a read that would block, it polls for a while ([`crate::poll`]).
pub(crate) struct DeadlineReader<S> {
    inner: S,
    deadline: Option<Instant>,
    /// The socket's read timeout is set (and must be cleared when the deadline goes).
    armed: bool,
    /// Polls before a blocking read: off during the handshake (a client that has not yet
    /// opened an export takes no poll slot), the session's own from then on.
    poller: Poller,
    /// False while the client cannot send anything useful before it hears from us (every
    /// request it sent is still on a worker): polling then only takes a CPU from the worker.
    /// The wait still adapts the window.
    may_poll: bool,
}

impl<S: NbdStream> Read for DeadlineReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline_in = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.inner.set_read_deadline(Some(left))?;
                self.armed = true;
                Some(left)
            }
            None if self.armed => {
                self.inner.set_read_deadline(None)?;
                self.armed = false;
                None
            }
            None => None,
        };
        if !self.inner.can_read_now() {
            return self.inner.read(buf);
        }
        let began = Instant::now();
        // A wait the reader may not poll for still adapts the window: a READ handed to a
        // worker while the window is closed is how a connection of lone READs opens it.
        let polled = if self.may_poll {
            self.poller.poll(deadline_in, || self.inner.read_now(buf))
        } else {
            self.poller.not_now()
        };
        match polled {
            Polled::Read(r) => r,
            Polled::Block => {
                let r = self.inner.read(buf);
                self.poller.blocked(began.elapsed());
                r
            }
        }
    }
}

/// Where transmission reads requests from: a stream whose reads can be given a deadline (a
/// request's payload must arrive in time; an idle client between requests may wait forever).
pub(crate) trait RequestSource: Read {
    /// Sets or clears the deadline of the reads that follow.
    fn set_deadline(&mut self, deadline: Option<Instant>);
    /// True if bytes of a next request have been received and not yet consumed.
    fn has_buffered(&self) -> bool;
    /// True if the reader polls for the client's next request before it blocks (a busy
    /// client, [`crate::poll`]).
    fn polls(&self) -> bool;
    /// Whether the reads that follow may poll: false while every request received is still
    /// being served elsewhere (the client is waiting for a reply, not about to send).
    fn set_may_poll(&mut self, may: bool);
}

impl<S: NbdStream> RequestSource for BufReader<DeadlineReader<S>> {
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.get_mut().deadline = deadline;
    }
    fn has_buffered(&self) -> bool {
        !self.buffer().is_empty()
    }
    fn polls(&self) -> bool {
        self.get_ref().poller.polls()
    }
    fn set_may_poll(&mut self, may: bool) {
        self.get_mut().may_poll = may;
    }
}

/// Writes replies, failing with `TimedOut` once one reply (everything from its first write to
/// the flush that ends it) has taken longer than `limit`. Each send is given the reply's
/// deadline ([`NbdStream::send_by`]), so a client that takes a few bytes now and then cannot
/// keep a reply going past its deadline, on TCP, Unix sockets and TLS alike.
///
/// During the handshake the handshake's own deadline bounds the writes as well: a client that
/// sends options and never reads the replies is dropped about when its handshake time is up,
/// not a reply timeout later. A reply may take [`HANDSHAKE_REPLY_GRACE`] past the deadline, or
/// that long from its start if it began after the deadline: the server's own time (opening an
/// export for `NBD_OPT_GO` may wait for a previous writer) is not charged to the client.
pub(crate) struct DeadlineWriter<S> {
    inner: S,
    limit: Duration,
    /// When the reply being written started; `None` between replies.
    busy_since: Option<Instant>,
    /// The handshake's deadline, while it lasts.
    handshake_deadline: Option<Instant>,
}

impl<S> DeadlineWriter<S> {
    /// When the reply begun at `since` must be sent by, and the error if it is not.
    fn reply_deadline(&self, since: Instant) -> (Instant, fn(Duration) -> io::Error) {
        let by_limit = since + self.limit;
        match self.handshake_deadline {
            Some(deadline) if deadline.max(since) + HANDSHAKE_REPLY_GRACE < by_limit => {
                (deadline.max(since) + HANDSHAKE_REPLY_GRACE, |_| {
                    io::Error::new(io::ErrorKind::TimedOut, "the client did not take its handshake replies")
                })
            }
            _ => (by_limit, |limit| {
                io::Error::new(io::ErrorKind::TimedOut, format!("the client has not taken a reply in {limit:?}"))
            }),
        }
    }
}

impl<S: NbdStream> Write for DeadlineWriter<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let since = *self.busy_since.get_or_insert_with(Instant::now);
        let (deadline, error) = self.reply_deadline(since);
        // Our own deadline running out is a timeout without an OS error; a kernel `ETIMEDOUT`
        // (TCP giving up on the peer) keeps its own message.
        self.inner.send_by(buf, deadline).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut if e.raw_os_error().is_none() => error(self.limit),
            _ => e,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        self.busy_since = None;
        Ok(())
    }
}

/// How long a handshake reply may still take to be sent once the handshake's deadline has
/// passed (or once it began, if it began after the deadline).
const HANDSHAKE_REPLY_GRACE: Duration = Duration::from_secs(1);

/// Size of the buffers in front of the socket.
pub(crate) const STREAM_BUFFER: usize = 64 << 10;

/// Serves one client on `stream` until it disconnects, then closes the stream.
///
/// Runs the handshake (bounded by `limits.handshake_timeout`, a TLS upgrade included), then
/// executes requests on a small pool of worker threads, replying possibly out of order. Returns
/// `Ok` when the client ends the session cleanly (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, or closing
/// between messages) and an error when it breaks the protocol or the stream fails; requests
/// already received are always finished first.
pub fn serve_connection<S: NbdStream>(
    stream: S,
    provider: &dyn ExportProvider,
    limits: &Limits,
) -> Result<(), NbdError> {
    serve_connection_then(stream, provider, limits, &|| {})
}

/// [`serve_connection`], calling `session_started` once the handshake has ended with an
/// export open (the server counts sessions apart from handshakes).
pub fn serve_connection_then<S: NbdStream>(
    stream: S,
    provider: &dyn ExportProvider,
    limits: &Limits,
    session_started: &dyn Fn(),
) -> Result<(), NbdError> {
    let limits = limits.normalized();
    let deadline = Instant::now() + limits.handshake_timeout;
    let closer = stream.clone_stream()?;
    let result = match run(stream, None, provider, &limits, deadline, session_started) {
        Ok(Flow::StartTls(sock, state)) => match &limits.tls {
            Some(tls) => match tls.accept(sock, deadline) {
                Ok(tls_stream) => {
                    debug!(client_auth = tls.client_auth(), "TLS established");
                    let mut ender = tls_stream.clone_stream()?;
                    match run(tls_stream, Some(state), provider, &limits, deadline, session_started) {
                        Ok(Flow::Done) => {
                            // A clean end (NBD_CMD_DISC, NBD_OPT_ABORT) gets TLS's close_notify,
                            // so the client can tell it from a cut connection. Bounded: a
                            // client that stopped reading must not hold the thread.
                            let _ = ender.set_write_deadline(Some(CLOSE_NOTIFY_TIMEOUT));
                            if let Err(e) = ender.end_session() {
                                debug!("close_notify not sent: {e}");
                            }
                            Ok(())
                        }
                        Ok(Flow::StartTls(..)) => Err(NbdError::Protocol("a second TLS upgrade".into())),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(handshake_timeout(NbdError::Tls(e), &limits)),
            },
            None => Err(NbdError::Protocol("TLS started without TLS settings".into())),
        },
        Ok(Flow::Done) => Ok(()),
        Err(e) => Err(e),
    };
    let _ = closer.shutdown_stream(Shutdown::Both);
    result
}

/// The longest a clean TLS end waits to send its `close_notify`.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// A handshake that timed out says so.
fn handshake_timeout(e: NbdError, limits: &Limits) -> NbdError {
    match e {
        NbdError::Io(e) | NbdError::Tls(e)
            if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) =>
        {
            NbdError::HandshakeTimeout(limits.handshake_timeout)
        }
        other => other,
    }
}

/// How one stage of a connection ended.
enum Flow<S> {
    /// The client is done (after transmission, or it left during the handshake).
    Done,
    /// The client asked for TLS: the raw stream, and the negotiation state to go on with.
    StartTls(S, handshake::State),
}

/// Negotiates on `stream` (greeting first unless `resumed` after a TLS upgrade), then serves
/// the session if one was opened.
fn run<S: NbdStream>(
    stream: S,
    resumed: Option<handshake::State>,
    provider: &dyn ExportProvider,
    limits: &Limits,
    deadline: Instant,
    session_started: &dyn Fn(),
) -> Result<Flow<S>, NbdError> {
    let tls_active = resumed.is_some();
    let control = parking_lot::Mutex::new(stream.clone_stream()?);
    let writer = stream.clone_stream()?;
    // Until the session starts the writer bounds each send by what the handshake has left.
    control.lock().set_write_deadline(Some(limits.reply_timeout))?;
    let mut reader = BufReader::with_capacity(
        STREAM_BUFFER,
        DeadlineReader {
            inner: stream,
            deadline: Some(deadline),
            armed: false,
            poller: InputPolling::off().poller(),
            may_poll: true,
        },
    );
    let mut writer = BufWriter::with_capacity(
        STREAM_BUFFER,
        DeadlineWriter {
            inner: writer,
            limit: limits.reply_timeout,
            busy_since: None,
            handshake_deadline: Some(deadline),
        },
    );
    let state = match resumed {
        Some(state) => state,
        None => match handshake::greet(&mut reader, &mut writer).map_err(|e| handshake_timeout(e, limits))? {
            Some(state) => state,
            None => return Ok(Flow::Done),
        },
    };
    let outcome = handshake::haggle(&mut reader, &mut writer, provider, limits, state, tls_active)
        .map_err(|e| handshake_timeout(e, limits))?;
    match outcome {
        handshake::Outcome::Ended => Ok(Flow::Done),
        handshake::Outcome::StartTls(state) => {
            if !reader.buffer().is_empty() {
                return Err(NbdError::Protocol("the client sent data before the TLS handshake began".into()));
            }
            Ok(Flow::StartTls(reader.into_inner().inner, state))
        }
        handshake::Outcome::Session(session) => {
            session_started();
            reader.set_deadline(None);
            reader.get_mut().poller = limits.polling.poller();
            writer.get_mut().handshake_deadline = None;
            control.lock().set_write_deadline(Some(limits.reply_timeout))?;
            let shut = || {
                let _ = control.lock().shutdown_stream(Shutdown::Both);
            };
            transmission::serve(&mut reader, writer, &session, limits, &shut)?;
            Ok(Flow::Done)
        }
    }
}
