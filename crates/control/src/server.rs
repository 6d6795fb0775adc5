//! parallaxd's side: accept control connections and run each request's command.

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use shutdown::{Ready, Shutdown};

use crate::wire::{self, EXIT_FAILURE, EXIT_USER, VERSION, bad};

/// Most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its whole request, and to take the reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the accept loop backs off after an accept error that would repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One request, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command line after the program name, paths already absolute.
    pub args: Vec<String>,
    /// The protocol version the client spoke.
    pub version: u32,
    /// The client's user id (from the socket's peer credentials).
    pub uid: u32,
    /// The client's process id.
    pub pid: i32,
}

/// What the daemon runs for each request, with the client's stdin, stdout and stderr;
/// returns the exit code.
pub type Handler = Arc<dyn Fn(&Request, File, File, File) -> i32 + Send + Sync>;

/// Serves requests on `listener` until `stop` is raised: one thread per connection, at most
/// [`MAX_CONNECTIONS`] at once. The accept loop blocks on the listener and the stop signal
/// together, so a request is picked up the moment it arrives and a stop is seen at once.
/// Bad requests are answered with [`EXIT_USER`] or dropped; nothing a client sends can make
/// this panic. Returns once `stop` is raised and the commands already running have finished.
pub fn serve(listener: UnixListener, handler: Handler, stop: &Shutdown) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    loop {
        if stop.wait_readable(&listener, None)? == Ready::Stopped {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                threads.retain(|t| !t.is_finished());
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!("control socket: {MAX_CONNECTIONS} commands running; refusing one");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (handler, counter) = (handler.clone(), active.clone());
                let spawned = std::thread::Builder::new().name("vdi-control".into()).spawn(move || {
                    if let Err(e) = serve_one(stream, &handler) {
                        tracing::warn!("control socket: {e}");
                    }
                    counter.fetch_sub(1, Ordering::AcqRel);
                });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        active.fetch_sub(1, Ordering::AcqRel);
                        tracing::error!("control socket: cannot start a thread: {e}");
                    }
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                if stop.wait_timeout(ACCEPT_BACKOFF) {
                    break;
                }
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Reads one request: its header, arguments and the three descriptors.
fn read_request(stream: &UnixStream) -> io::Result<(wire::Header, Vec<String>, Vec<OwnedFd>)> {
    let mut first = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut first)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => break r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let mut data = first[..received.bytes.min(first.len())].to_vec();
    if data.is_empty() {
        return Err(bad("the client sent nothing"));
    }
    let mut reader = stream;
    let header = loop {
        match wire::parse_header(&data)? {
            Some(h) => break h,
            None => read_more(&mut reader, &mut data, 12)?,
        }
    };
    let total = header.header_len + header.payload_len;
    while data.len() < total {
        read_more(&mut reader, &mut data, total)?;
    }
    if data.len() > total {
        return Err(bad("trailing bytes after the request"));
    }
    let args = wire::decode_args(&data[header.header_len..])?;
    Ok((header, args, fds))
}

/// Reads more of the request, up to `total` bytes in all.
fn read_more(reader: &mut &UnixStream, data: &mut Vec<u8>, total: usize) -> io::Result<()> {
    let want = total.saturating_sub(data.len());
    let mut buf = vec![0u8; want.clamp(1, 64 * 1024)];
    let n = loop {
        match reader.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if n == 0 {
        return Err(bad("the client hung up in the middle of its request"));
    }
    data.extend_from_slice(&buf[..n]);
    Ok(())
}

fn reply(mut stream: &UnixStream, code: i32) -> io::Result<()> {
    stream.write_all(&wire::encode_reply(code))
}

fn serve_one(stream: UnixStream, handler: &Handler) -> io::Result<()> {
    let started = Instant::now();
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let (uid, pid) = (peer.uid.as_raw(), peer.pid.as_raw_nonzero().get());
    let (header, args, fds) = match read_request(&stream) {
        Ok(r) => r,
        Err(e) => {
            let _ = reply(&stream, EXIT_USER);
            return Err(io::Error::new(e.kind(), format!("request from uid {uid} pid {pid}: {e}")));
        }
    };
    let [stdin, stdout, stderr]: [OwnedFd; 3] = match fds.try_into() {
        Ok(f) => f,
        Err(fds) => {
            let _ = reply(&stream, EXIT_USER);
            return Err(bad(format!("expected 3 descriptors (stdin, stdout, stderr), got {}", fds.len())));
        }
    };
    let (stdin, stdout, mut stderr) = (File::from(stdin), File::from(stdout), File::from(stderr));
    let me = rustix::process::getuid();
    if !(peer.uid.is_root() || peer.uid == me) {
        let _ = writeln!(
            stderr,
            "vdi: error: parallaxd runs as uid {} and serves only that user and root; run vdi as one of them",
            me.as_raw()
        );
        tracing::info!(uid, pid, "vdi command refused: wrong user");
        return reply(&stream, EXIT_USER);
    }
    if header.version > VERSION {
        let _ = writeln!(
            stderr,
            "vdi: error: this vdi speaks control protocol version {}, parallaxd only up to {VERSION}; \
             use the vdi that came with this parallaxd, or restart parallaxd after the upgrade",
            header.version
        );
        tracing::info!(uid, pid, version = header.version, "vdi command refused: unknown protocol version");
        return reply(&stream, EXIT_USER);
    }
    let request = Request { args, version: header.version, uid, pid };
    let what = request.args.join(" ");
    let handler = handler.clone();
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&request, stdin, stdout, stderr)))
        .unwrap_or_else(|_| {
            tracing::error!(uid, pid, command = %what, "a vdi command panicked");
            EXIT_FAILURE
        });
    // Logged before the reply, so the line is written by the time the client has its answer.
    tracing::info!(
        uid,
        pid,
        command = %what,
        exit = code,
        ms = %format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        "vdi command"
    );
    reply(&stream, code)
}
