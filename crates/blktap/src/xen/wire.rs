//! A client of xenstored's wire protocol (Xen's public header `io/xs_wire.h`), written for
//! Parallax instead of using `xenstore-rs`: that crate is GPL-3.0-only and its synchronous API
//! has no watches, which the backend needs so it never polls.
//!
//! Every message is a 16-byte header — `type`, `req_id`, `tx_id`, `len`, little-endian u32s
//! (native order: xenstored runs on the same host) — and `len` bytes of payload, at most
//! [`PAYLOAD_MAX`]: NUL-separated strings. Replies carry the request's `type` and `req_id`, or
//! `XS_ERROR` with an errno name (`ENOENT`, `EAGAIN`, ...). Watch events (`XS_WATCH_EVENT`,
//! payload `path\0token\0`) arrive on the same connection at any time, between replies.
//!
//! One reader thread owns the receiving half: replies go to the one request in flight
//! (requests are serialised, as xenstored answers a connection in order), watch events to a
//! queue whose [`Wakeup`] the backend polls.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::Mutex;

use super::wakeup::Wakeup;
use crate::{Error, Result};

/// The largest payload xenstored accepts or sends (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
const HEADER_LEN: usize = 16;

const XS_DIRECTORY: u32 = 1;
const XS_READ: u32 = 2;
const XS_WATCH: u32 = 4;
const XS_UNWATCH: u32 = 5;
const XS_TRANSACTION_START: u32 = 6;
const XS_TRANSACTION_END: u32 = 7;
const XS_WRITE: u32 = 11;
const XS_RM: u32 = 13;
const XS_WATCH_EVENT: u32 = 15;
const XS_ERROR: u32 = 16;

/// The token of every watch this client sets (events name the path that changed).
const TOKEN: &str = "parallax";
/// Watch events kept until taken; older ones are dropped beyond this.
const MAX_QUEUED_EVENTS: usize = 1024;
/// How often a transaction that lost a race with another writer is retried.
const TRANSACTION_RETRIES: usize = 32;

/// One message of the wire protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    kind: u32,
    req_id: u32,
    tx_id: u32,
    payload: Vec<u8>,
}

impl Message {
    fn encode(&self) -> Result<Vec<u8>> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(Error::Protocol(format!(
                "xenstore request of {} bytes exceeds the protocol's {PAYLOAD_MAX}",
                self.payload.len()
            )));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        for word in [self.kind, self.req_id, self.tx_id, self.payload.len() as u32] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let len = word(12) as usize;
        if len > PAYLOAD_MAX {
            return Err(io::Error::new(ErrorKind::InvalidData, format!("xenstore message of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Self { kind: word(0), req_id: word(4), tx_id: word(8), payload })
    }
}

/// `a\0b\0...` for the given strings (each NUL-terminated).
fn nul_terminated(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

/// The NUL-separated strings of a payload (a trailing NUL ends the last one).
fn strings(payload: &[u8]) -> Vec<String> {
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// The error an `XS_ERROR` reply names, as an I/O error of the matching kind.
fn wire_error(payload: &[u8]) -> io::Error {
    let name = strings(payload).into_iter().next().unwrap_or_default();
    let kind = match name.as_str() {
        "ENOENT" => ErrorKind::NotFound,
        "EACCES" => ErrorKind::PermissionDenied,
        "EEXIST" => ErrorKind::AlreadyExists,
        "EINVAL" => ErrorKind::InvalidInput,
        "EAGAIN" => ErrorKind::WouldBlock,
        "ENOSPC" | "ENOMEM" | "EQUOTA" => ErrorKind::OutOfMemory,
        _ => ErrorKind::Other,
    };
    io::Error::new(kind, format!("xenstored: {name}"))
}

/// The two ends a client can talk through.
#[derive(Debug)]
enum Connection {
    /// xenstored's Unix socket (dom0 with a local xenstored).
    Socket(UnixStream),
    /// The kernel's xenbus device (`/dev/xen/xenbus`; a driver domain, or a stub xenstored).
    Device(File),
}

impl Connection {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Socket(s) => Self::Socket(s.try_clone()?),
            Self::Device(f) => Self::Device(f.try_clone()?),
        })
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Socket(s) => s.read(buf),
            Self::Device(f) => f.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Socket(s) => s.write(buf),
            Self::Device(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The sending half: one request at a time.
#[derive(Debug)]
struct Requester {
    conn: Connection,
    next_id: u32,
    replies: Receiver<io::Result<Message>>,
}

/// Watch events received and not yet taken.
#[derive(Debug)]
struct Events {
    paths: Mutex<VecDeque<String>>,
    ready: Wakeup,
}

/// A connection to xenstored.
#[derive(Debug)]
pub struct XsClient {
    requester: Mutex<Requester>,
    events: std::sync::Arc<Events>,
    reader: Option<JoinHandle<()>>,
    /// For a socket: shut down on drop so the reader thread ends.
    socket: Option<UnixStream>,
}

impl XsClient {
    /// Connects the way libxenstore does: `$XENSTORED_PATH` (a socket, or a xenbus device),
    /// else `/run/xenstored/socket` (or `/var/run/...`), else the xenbus device.
    pub fn open() -> Result<Self> {
        let chosen: Option<PathBuf> = std::env::var_os("XENSTORED_PATH").map(PathBuf::from);
        let mut sockets: Vec<PathBuf> = chosen.iter().cloned().collect();
        sockets.push("/run/xenstored/socket".into());
        sockets.push("/var/run/xenstored/socket".into());
        for path in &sockets {
            if let Ok(s) = UnixStream::connect(path) {
                return Self::from_socket(s);
            }
        }
        let device = chosen.unwrap_or_else(|| "/dev/xen/xenbus".into());
        let file = OpenOptions::new().read(true).write(true).open(&device).map_err(|e| {
            Error::Io(io::Error::new(
                e.kind(),
                format!("cannot reach xenstored (no socket at {sockets:?}; {}: {e})", device.display()),
            ))
        })?;
        Self::start(Connection::Device(file), None)
    }

    /// A client over an already connected socket.
    pub fn from_socket(socket: UnixStream) -> Result<Self> {
        let keep = socket.try_clone()?;
        Self::start(Connection::Socket(socket), Some(keep))
    }

    fn start(conn: Connection, socket: Option<UnixStream>) -> Result<Self> {
        let events = std::sync::Arc::new(Events { paths: Mutex::new(VecDeque::new()), ready: Wakeup::new()? });
        let (reply_tx, replies) = unbounded();
        let mut receiving = conn.try_clone()?;
        let queue = events.clone();
        let reader = std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || read_loop(&mut receiving, &reply_tx, &queue))?;
        Ok(Self {
            requester: Mutex::new(Requester { conn, next_id: 1, replies }),
            events,
            reader: Some(reader),
            socket,
        })
    }

    /// Sends one request and returns the reply's payload (an `XS_ERROR` reply as an error).
    fn request(&self, kind: u32, tx_id: u32, payload: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut r = self.requester.lock();
        let req_id = r.next_id;
        r.next_id = r.next_id.wrapping_add(1);
        let bytes = Message { kind, req_id, tx_id, payload }
            .encode()
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        r.conn.write_all(&bytes)?;
        let reply = loop {
            let reply = r
                .replies
                .recv()
                .map_err(|_| io::Error::new(ErrorKind::BrokenPipe, "the xenstore connection is closed"))??;
            // A late reply to an earlier request that gave up waiting is not ours: skip it.
            if reply.req_id == req_id {
                break reply;
            }
        };
        match reply.kind {
            XS_ERROR => Err(wire_error(&reply.payload)),
            k if k == kind => Ok(reply.payload),
            k => Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("xenstore reply of type {k} to a request of type {kind}"),
            )),
        }
    }

    fn read_in(&self, tx: u32, path: &str) -> io::Result<Option<String>> {
        match self.request(XS_READ, tx, nul_terminated(&[path])) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_in(&self, tx: u32, path: &str, value: &str) -> io::Result<()> {
        let mut payload = nul_terminated(&[path]);
        payload.extend_from_slice(value.as_bytes());
        self.request(XS_WRITE, tx, payload).map(drop)
    }

    /// Runs `writes` as one transaction if `dir` exists (false if not, nothing written),
    /// retrying when another writer raced it (`EAGAIN`).
    fn write_transaction(&self, dir: &str, writes: &[(&str, &str)]) -> io::Result<bool> {
        for _ in 0..TRANSACTION_RETRIES {
            let id = strings(&self.request(XS_TRANSACTION_START, 0, vec![0])?).into_iter().next().unwrap_or_default();
            let Ok(tx) = id.parse::<u32>() else {
                return Err(io::Error::new(ErrorKind::InvalidData, format!("transaction id '{id}'")));
            };
            let applied = match self.read_in(tx, dir) {
                Ok(Some(_)) => {
                    writes.iter().try_for_each(|(path, value)| self.write_in(tx, path, value)).map(|()| true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            let commit = matches!(applied, Ok(true));
            let end = self.request(XS_TRANSACTION_END, tx, nul_terminated(&[if commit { "T" } else { "F" }]));
            let applied = match applied {
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue, // raced inside: run it again
                other => other?,
            };
            match end {
                Ok(_) => return Ok(applied),
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue, // raced: run it again
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(ErrorKind::WouldBlock, format!("xenstore transaction lost {TRANSACTION_RETRIES} races")))
    }
}

/// Receives messages until the connection ends: watch events to the queue, everything else to
/// the request in flight. The end (or a garbled message) is passed on as an error, and wakes
/// the watcher so it finds out at its next request.
fn read_loop(conn: &mut Connection, replies: &Sender<io::Result<Message>>, events: &Events) {
    loop {
        match Message::read_from(conn) {
            Ok(m) if m.kind == XS_WATCH_EVENT => {
                if let Some(path) = strings(&m.payload).into_iter().next() {
                    let mut paths = events.paths.lock();
                    // Bounded whatever the guests write: an event is only a reason to look, and
                    // the descriptor stays raised, so dropping the oldest path loses nothing.
                    if paths.len() >= MAX_QUEUED_EVENTS {
                        paths.pop_front();
                    }
                    paths.push_back(path);
                    drop(paths);
                    events.ready.signal();
                }
            }
            Ok(m) => {
                if replies.send(Ok(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = replies.send(Err(e));
                events.ready.signal();
                return;
            }
        }
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        // On the xenbus device a blocked read cannot be interrupted; the reader thread ends
        // with the process.
    }
}

fn store_error(op: &str, path: &str, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("xenstore {op} {path}: {e}")))
}

impl super::store::XenStore for XsClient {
    fn read(&self, path: &str) -> Result<Option<String>> {
        self.read_in(0, path).map_err(|e| store_error("read", path, e))
    }

    fn write(&self, path: &str, value: &str) -> Result<()> {
        self.write_in(0, path, value).map_err(|e| store_error("write", path, e))
    }

    fn write_all_in(&self, dir: &str, writes: &[(&str, &str)]) -> Result<bool> {
        self.write_transaction(dir, writes).map_err(|e| store_error("transaction in", dir, e))
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        match self.request(XS_DIRECTORY, 0, nul_terminated(&[path])) {
            Ok(v) => Ok(strings(&v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(store_error("directory", path, e)),
        }
    }

    fn rm(&self, path: &str) -> Result<()> {
        match self.request(XS_RM, 0, nul_terminated(&[path])) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_error("rm", path, e)),
        }
    }

    fn watch(&self, path: &str) -> Result<()> {
        match self.request(XS_WATCH, 0, nul_terminated(&[path, TOKEN])) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()), // watched already
            Err(e) => Err(store_error("watch", path, e)),
        }
    }

    fn unwatch(&self, path: &str) -> Result<()> {
        match self.request(XS_UNWATCH, 0, nul_terminated(&[path, TOKEN])) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_error("unwatch", path, e)),
        }
    }

    fn events(&self) -> BorrowedFd<'_> {
        self.events.ready.as_fd()
    }

    fn take_events(&self) -> Vec<String> {
        self.events.ready.clear();
        self.events.paths.lock().drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::xen::store::XenStore;

    /// A scripted xenstored on the other end of a socket pair: `answer` turns each request
    /// into the messages sent back (watch events may come before the reply). Returns the
    /// client and the requests the server saw.
    fn fake_xenstored(
        mut answer: impl FnMut(&Message) -> Vec<Message> + Send + 'static,
    ) -> (XsClient, std::thread::JoinHandle<Vec<Message>>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Ok(m) = Message::read_from(&mut theirs) {
                for out in answer(&m) {
                    theirs.write_all(&out.encode().unwrap()).unwrap();
                }
                seen.push(m);
            }
            seen
        });
        (XsClient::from_socket(ours).unwrap(), server)
    }

    fn reply(to: &Message, payload: &[u8]) -> Message {
        Message { kind: to.kind, req_id: to.req_id, tx_id: to.tx_id, payload: payload.to_vec() }
    }

    fn error(to: &Message, name: &str) -> Message {
        Message { kind: XS_ERROR, req_id: to.req_id, tx_id: to.tx_id, payload: nul_terminated(&[name]) }
    }

    fn event(path: &str) -> Message {
        Message { kind: XS_WATCH_EVENT, req_id: 0, tx_id: 0, payload: nul_terminated(&[path, TOKEN]) }
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [rustix::event::PollFd::from_borrowed_fd(fd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() == 1
    }

    /// A tiny xenstored: a flat map of nodes, directories derived from the paths.
    fn tiny_store(m: &Message, nodes: &mut BTreeMap<String, String>) -> Vec<Message> {
        let args = strings(&m.payload);
        let path = args.first().cloned().unwrap_or_default();
        match m.kind {
            XS_READ => match nodes.get(&path) {
                Some(v) => vec![reply(m, v.as_bytes())],
                None => vec![error(m, "ENOENT")],
            },
            XS_WRITE => {
                let at = m.payload.iter().position(|&b| b == 0).unwrap();
                nodes.insert(path, String::from_utf8(m.payload[at + 1..].to_vec()).unwrap());
                vec![reply(m, b"OK\0")]
            }
            XS_DIRECTORY => {
                let prefix = format!("{path}/");
                let mut names: Vec<&str> = nodes
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .map(|rest| rest.split('/').next().unwrap())
                    .collect();
                names.dedup();
                if names.is_empty() && !nodes.contains_key(&path) {
                    return vec![error(m, "ENOENT")];
                }
                vec![reply(m, &nul_terminated(&names))]
            }
            XS_RM => match nodes.remove(&path) {
                Some(_) => vec![reply(m, b"OK\0")],
                None => vec![error(m, "ENOENT")],
            },
            _ => vec![error(m, "ENOSYS")],
        }
    }

    #[test]
    fn requests_and_replies_follow_the_wire_format() {
        let mut nodes = BTreeMap::new();
        let (xs, server) = fake_xenstored(move |m| tiny_store(m, &mut nodes));
        assert_eq!(xs.read("/a/b").unwrap(), None, "ENOENT is an absent node");
        xs.write("/a/b", "hello world").unwrap();
        xs.write("/a/c", "").unwrap();
        assert_eq!(xs.read("/a/b").unwrap().as_deref(), Some("hello world"));
        assert_eq!(xs.read("/a/c").unwrap().as_deref(), Some(""));
        assert_eq!(xs.directory("/a").unwrap(), ["b", "c"]);
        assert!(xs.directory("/nope").unwrap().is_empty());
        xs.rm("/a/b").unwrap();
        xs.rm("/a/b").unwrap();
        assert_eq!(xs.read("/a/b").unwrap(), None);
        let e = xs.watch("/x").unwrap_err().to_string();
        assert!(e.contains("ENOSYS") && e.contains("watch /x"), "{e}");
        drop(xs);
        let seen = server.join().unwrap();
        // The bytes of one request, exactly: header then `path\0value`.
        let write = seen.iter().find(|m| m.kind == XS_WRITE).unwrap();
        assert_eq!(write.payload, b"/a/b\0hello world");
        assert_eq!(write.tx_id, 0);
        let bytes = write.encode().unwrap();
        assert_eq!(&bytes[..4], &XS_WRITE.to_le_bytes());
        assert_eq!(&bytes[12..16], &16u32.to_le_bytes());
        // Request ids are distinct, so a stray reply is caught.
        let mut ids: Vec<u32> = seen.iter().map(|m| m.req_id).collect();
        ids.dedup();
        assert_eq!(ids.len(), seen.len());
    }

    #[test]
    fn a_watch_event_between_request_and_reply_is_queued_not_taken_as_the_reply() {
        let (xs, _server) = fake_xenstored(|m| match m.kind {
            XS_WATCH => vec![event("/w"), reply(m, b"OK\0")],
            XS_READ => vec![event("/w/state"), event("/w/other"), reply(m, b"4")],
            _ => vec![reply(m, b"OK\0")],
        });
        assert!(!readable(xs.events()));
        xs.watch("/w").unwrap();
        assert_eq!(xs.read("/w/state").unwrap().as_deref(), Some("4"));
        assert!(readable(xs.events()), "queued events make the descriptor readable");
        assert_eq!(xs.take_events(), ["/w", "/w/state", "/w/other"]);
        assert!(!readable(xs.events()), "taking them lowers it");
        assert!(xs.take_events().is_empty());
    }

    #[test]
    fn a_transaction_that_loses_a_race_is_run_again() {
        let mut ends = 0;
        let (xs, server) = fake_xenstored(move |m| match m.kind {
            XS_TRANSACTION_START => vec![reply(m, format!("{}\0", 7 + ends).as_bytes())],
            XS_TRANSACTION_END => {
                ends += 1;
                if ends == 1 { vec![error(m, "EAGAIN")] } else { vec![reply(m, b"OK\0")] }
            }
            _ => vec![reply(m, b"OK\0")],
        });
        assert!(xs.write_all_in("/d", &[("/d/feature", "1"), ("/d/state", "2")]).unwrap());
        drop(xs);
        let seen = server.join().unwrap();
        let kinds: Vec<(u32, u32)> = seen.iter().map(|m| (m.kind, m.tx_id)).collect();
        assert_eq!(
            kinds,
            [
                (XS_TRANSACTION_START, 0),
                (XS_READ, 7),
                (XS_WRITE, 7),
                (XS_WRITE, 7),
                (XS_TRANSACTION_END, 7),
                (XS_TRANSACTION_START, 0),
                (XS_READ, 8),
                (XS_WRITE, 8),
                (XS_WRITE, 8),
                (XS_TRANSACTION_END, 8),
            ]
        );
        assert_eq!(seen[1].payload, b"/d\0", "the directory is checked inside the transaction");
        assert_eq!(seen[4].payload, b"T\0");
    }

    #[test]
    fn a_transaction_into_a_removed_directory_writes_nothing() {
        let (xs, server) = fake_xenstored(|m| match m.kind {
            XS_TRANSACTION_START => vec![reply(m, b"5\0")],
            XS_READ => vec![error(m, "ENOENT")],
            _ => vec![reply(m, b"OK\0")],
        });
        assert!(!xs.write_all_in("/gone", &[("/gone/state", "4")]).unwrap());
        drop(xs);
        let seen = server.join().unwrap();
        assert!(!seen.iter().any(|m| m.kind == XS_WRITE), "nothing may recreate the directory");
        let end = seen.iter().find(|m| m.kind == XS_TRANSACTION_END).unwrap();
        assert_eq!(end.payload, b"F\0");
    }

    #[test]
    fn a_failed_write_aborts_its_transaction() {
        let (xs, server) = fake_xenstored(|m| match m.kind {
            XS_TRANSACTION_START => vec![reply(m, b"3\0")],
            XS_WRITE => vec![error(m, "EACCES")],
            _ => vec![reply(m, b"OK\0")],
        });
        let e = xs.write_all_in("/d", &[("/d/state", "2")]).unwrap_err();
        assert!(e.to_string().contains("EACCES"), "{e}");
        drop(xs);
        let seen = server.join().unwrap();
        let end = seen.iter().find(|m| m.kind == XS_TRANSACTION_END).unwrap();
        assert_eq!(end.payload, b"F\0");
    }

    #[test]
    fn oversized_requests_garbled_replies_and_a_dead_daemon_are_errors_not_hangs() {
        let (xs, _server) = fake_xenstored(|m| vec![reply(m, b"")]);
        let long = "x".repeat(PAYLOAD_MAX);
        assert!(xs.write("/a", &long).unwrap_err().to_string().contains("exceeds"));
        // A reply of the wrong type.
        let (xs, _server) = fake_xenstored(|m| vec![Message { kind: XS_RM, ..reply(m, b"") }]);
        assert!(xs.read("/a").unwrap_err().to_string().contains("type"));
        // A header claiming more than the protocol allows ends the connection.
        let (xs, _server) = fake_xenstored(|m| {
            vec![Message { kind: XS_READ, req_id: m.req_id, tx_id: 0, payload: vec![0; PAYLOAD_MAX] }]
        });
        assert_eq!(xs.read("/a").unwrap().map(|v| v.len()), Some(PAYLOAD_MAX));
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let xs = XsClient::from_socket(ours).unwrap();
        let server = std::thread::spawn(move || {
            let m = Message::read_from(&mut theirs).unwrap();
            let mut header = Vec::new();
            for w in [XS_READ, m.req_id, 0, PAYLOAD_MAX as u32 + 1] {
                header.extend_from_slice(&w.to_le_bytes());
            }
            theirs.write_all(&header).unwrap();
        });
        let e = xs.read("/a").unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
        server.join().unwrap();
        assert!(readable(xs.events()), "the watcher is woken to find out");
        assert!(xs.read("/a").is_err(), "and every later request fails at once");
        // The daemon goes away while a request waits.
        let (xs, _server) = fake_xenstored(|_| Vec::new());
        std::thread::scope(|s| {
            let waiting = s.spawn(|| xs.read("/a"));
            // The fake answers nothing; the connection ending ends the wait.
            xs.socket.as_ref().unwrap().shutdown(std::net::Shutdown::Read).unwrap();
            assert!(waiting.join().unwrap().is_err());
        });
    }
}
