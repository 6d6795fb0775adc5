//! The simulated transport: how a frontend process reaches a backend without Xen.
//!
//! The frontend creates a memory file (`memfd`) that stands for the pages it grants: grant
//! reference `k` is page `k` of the file. It seals the file against shrinking (so the backend
//! can never fault on a page that vanished), lays the ring out on consecutive pages starting at
//! `ring-ref`, and connects to the backend's Unix socket. The handshake mirrors the xenstore
//! keys of a real blkif connection:
//!
//! * frontend → backend, one line with the memfd attached (`SCM_RIGHTS`):
//!   `vdi=NAME ring-ref=N ring-page-order=K protocol=x86_64-abi\n`
//! * backend → frontend, one line: `connected sectors=N sector-size=512 info=I
//!   feature-flush-cache=1 feature-barrier=1 feature-discard=1 discard-granularity=4096
//!   feature-max-indirect-segments=M\n`, or `error MESSAGE\n`.
//!
//! After the handshake the same socket is the event channel ([`SocketEvents`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{SealFlags, fcntl_get_seals, fstatfs};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::abi::{Abi, PAGE_SIZE};
use crate::engine::MAX_INDIRECT_SEGMENTS;
use crate::event::SocketEvents;
use crate::grant::SimGrantTable;
use crate::ring::BackRing;
use crate::shm::SharedMem;
use crate::{Error, Result};

/// Most pages a simulated frontend may grant (256 MiB of address space in the backend).
pub const MAX_GRANT_PAGES: u64 = 65536;
/// Largest ring: 2^4 = 16 pages (Linux blkback's `max_ring_page_order` default is 4).
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// How long the backend waits for a frontend's attach line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: usize = 4096;

/// `TMPFS_MAGIC` of statfs(2): plain memfds live on the kernel's internal tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// `VDISK_READONLY`: bit of the `info` key for a read-only disk.
pub const VDISK_READONLY: u32 = 4;

/// What a frontend asks for (its xenstore keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The VDI to serve (a name, an id, or `NAME@SNAPSHOT`); like the toolstack's `params`.
    pub vdi: String,
    /// First grant page of the ring.
    pub ring_ref: u32,
    /// The ring spans `2^ring_page_order` consecutive grant pages.
    pub ring_page_order: u32,
    /// The guest ABI of the ring slots.
    pub protocol: Abi,
}

/// What the backend publishes about the disk (its xenstore keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// The disk refuses writes.
    pub read_only: bool,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u32,
}

impl DiskInfo {
    /// The published facts of a disk of `bytes` bytes.
    pub fn new(bytes: u64, read_only: bool) -> Self {
        Self { sectors: bytes / 512, read_only, max_indirect_segments: MAX_INDIRECT_SEGMENTS as u32 }
    }
}

/// The `protocol` value of an ABI (as in xenstore).
pub fn protocol_name(abi: Abi) -> &'static str {
    match abi {
        Abi::X86_64 => "x86_64-abi",
        Abi::X86_32 => "x86_32-abi",
    }
}

/// The ABI named by a `protocol` value.
pub fn parse_protocol(s: &str) -> Option<Abi> {
    match s {
        "x86_64-abi" => Some(Abi::X86_64),
        "x86_32-abi" => Some(Abi::X86_32),
        _ => None,
    }
}

fn protocol_error(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

fn keys(line: &str) -> Result<HashMap<&str, &str>> {
    let mut out = HashMap::new();
    for word in line.split_ascii_whitespace() {
        let (k, v) = word.split_once('=').ok_or_else(|| protocol_error(format!("'{word}' is not key=value")))?;
        if out.insert(k, v).is_some() {
            return Err(protocol_error(format!("key '{k}' given twice")));
        }
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(map: &HashMap<&str, &str>, key: &str) -> Result<T> {
    let v = map.get(key).ok_or_else(|| protocol_error(format!("missing '{key}'")))?;
    v.parse().map_err(|_| protocol_error(format!("'{key}={v}' is not a number")))
}

impl Attach {
    /// The attach line (without the newline).
    pub fn encode(&self) -> String {
        format!(
            "vdi={} ring-ref={} ring-page-order={} protocol={}",
            self.vdi,
            self.ring_ref,
            self.ring_page_order,
            protocol_name(self.protocol)
        )
    }

    /// Parses an attach line.
    pub fn parse(line: &str) -> Result<Self> {
        let map = keys(line)?;
        let vdi = map.get("vdi").ok_or_else(|| protocol_error("missing 'vdi'"))?.to_string();
        let protocol = map.get("protocol").copied().unwrap_or("x86_64-abi");
        let protocol =
            parse_protocol(protocol).ok_or_else(|| protocol_error(format!("unknown protocol '{protocol}'")))?;
        let ring_page_order = match map.get("ring-page-order") {
            Some(_) => number(&map, "ring-page-order")?,
            None => 0,
        };
        if ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(protocol_error(format!("ring-page-order {ring_page_order} above {MAX_RING_PAGE_ORDER}")));
        }
        Ok(Self { vdi, ring_ref: number(&map, "ring-ref")?, ring_page_order, protocol })
    }
}

impl DiskInfo {
    /// The `connected` line (without the newline).
    pub fn encode(&self) -> String {
        format!(
            "connected sectors={} sector-size=512 info={} feature-flush-cache=1 feature-barrier=1 feature-discard=1 discard-granularity=4096 feature-max-indirect-segments={}",
            self.sectors,
            if self.read_only { VDISK_READONLY } else { 0 },
            self.max_indirect_segments
        )
    }

    /// Parses the backend's reply line: the disk facts, or the backend's error message.
    pub fn parse_reply(line: &str) -> Result<Self> {
        if let Some(msg) = line.strip_prefix("error ") {
            return Err(Error::Refused(msg.to_string()));
        }
        let rest =
            line.strip_prefix("connected").ok_or_else(|| protocol_error(format!("unexpected reply '{line}'")))?;
        let map = keys(rest)?;
        let info: u32 = number(&map, "info")?;
        Ok(Self {
            sectors: number(&map, "sectors")?,
            read_only: info & VDISK_READONLY != 0,
            max_indirect_segments: number(&map, "feature-max-indirect-segments")?,
        })
    }
}

/// Reads bytes until a newline (not included), at most [`MAX_LINE`], all before `deadline`
/// (a peer trickling one byte at a time cannot hold the reader longer).
fn read_line(stream: &UnixStream, mut data: Vec<u8>, deadline: Instant) -> Result<String> {
    let mut reader = stream;
    while !data.contains(&b'\n') {
        if data.len() > MAX_LINE {
            return Err(protocol_error("handshake line too long"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(protocol_error("handshake timed out"));
        }
        stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 256];
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Err(Error::PeerGone),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(protocol_error("handshake timed out"));
            }
            Err(e) => return Err(e.into()),
        };
        data.extend_from_slice(&chunk[..n]);
    }
    let end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    if data.len() > end + 1 {
        return Err(protocol_error("data after the handshake line"));
    }
    String::from_utf8(data[..end].to_vec()).map_err(|_| protocol_error("handshake line is not UTF-8"))
}

/// The backend's listening socket.
#[derive(Debug)]
pub struct SimListener {
    listener: UnixListener,
}

impl SimListener {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        Ok(Self { listener: UnixListener::bind(path)? })
    }

    /// Waits up to `timeout` for a frontend to connect.
    pub fn accept(&self, timeout: Duration) -> Result<Option<UnixStream>> {
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
        let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(Error::Io(e.into())),
        }
        self.take()
    }

    /// Waits, with no timeout, for a frontend to connect or `stop` to be raised (then `None`).
    /// `None` also when the connection went away before it could be taken: look at `stop`.
    pub fn accept_until(&self, stop: &shutdown::Shutdown) -> Result<Option<UnixStream>> {
        match stop.wait_readable(&self.listener, None)? {
            shutdown::Ready::Readable => self.take(),
            shutdown::Ready::Stopped | shutdown::Ready::TimedOut => Ok(None),
        }
    }

    /// Accepts a connection the listener reported ready, without blocking.
    fn take(&self) -> Result<Option<UnixStream>> {
        self.listener.set_nonblocking(true)?;
        let r = self.listener.accept();
        self.listener.set_nonblocking(false)?;
        match r {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A frontend that has sent its attach line, waiting for the backend's answer.
#[derive(Debug)]
pub struct SimPending {
    stream: UnixStream,
    attach: Attach,
    memory: File,
}

/// The backend's half of an accepted connection: everything a [`crate::server::RingServer`]
/// needs.
#[derive(Debug)]
pub struct SimBackend {
    /// The ring, attached at index 0.
    pub ring: BackRing,
    /// The frontend's granted pages.
    pub grants: SimGrantTable,
    /// The event channel.
    pub events: SocketEvents,
}

impl SimPending {
    /// Reads the attach line and the memory file from a newly connected frontend.
    pub fn read(stream: UnixStream) -> Result<Self> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut first = vec![0u8; MAX_LINE];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = loop {
            match rustix::net::recvmsg(
                &stream,
                &mut [IoSliceMut::new(&mut first)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(r) => break r,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Err(protocol_error("handshake timed out")),
                Err(e) => return Err(Error::Io(e.into())),
            }
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        if received.bytes == 0 {
            return Err(Error::PeerGone);
        }
        first.truncate(received.bytes);
        let line = read_line(&stream, first, deadline)?;
        let attach = Attach::parse(&line)?;
        let memory = match fds.len() {
            1 => File::from(fds.remove(0)),
            n => return Err(protocol_error(format!("expected the grant memory file, got {n} descriptors"))),
        };
        stream.set_read_timeout(None)?;
        Ok(Self { stream, attach, memory })
    }

    /// What the frontend asked for.
    pub fn attach(&self) -> &Attach {
        &self.attach
    }

    /// Refuses the connection with a message for the frontend.
    pub fn reject(self, message: &str) {
        let line = format!("error {}\n", message.replace('\n', " "));
        let _ = (&self.stream).write_all(line.as_bytes());
    }

    /// Maps the frontend's memory, attaches the ring, and tells the frontend the disk facts.
    /// Refused (and the frontend told why) if the memory is not sealed against shrinking or
    /// does not hold the ring.
    pub fn accept(self, disk: &DiskInfo) -> Result<SimBackend> {
        match self.map() {
            Ok((ring_mem, grant_mem)) => {
                let ring = BackRing::new(Arc::new(ring_mem), self.attach.protocol)?;
                let grants = SimGrantTable::new(Arc::new(grant_mem))?;
                let line = format!("{}\n", disk.encode());
                (&self.stream).write_all(line.as_bytes())?;
                Ok(SimBackend { ring, grants, events: SocketEvents::new(self.stream) })
            }
            Err(e) => {
                let msg = e.to_string();
                self.reject(&msg);
                Err(e)
            }
        }
    }

    fn map(&self) -> Result<(SharedMem, SharedMem)> {
        // Only plain shared memory: a hugetlbfs memfd can fault (SIGBUS) after the frontend
        // punches a hole in it, which F_SEAL_SHRINK does not prevent; tmpfs refills holes.
        let fs = fstatfs(&self.memory).map_err(|e| Error::Io(e.into()))?;
        if fs.f_type as i64 != TMPFS_MAGIC {
            return Err(protocol_error("the grant memory is not a memfd on tmpfs (MFD_HUGETLB is refused)"));
        }
        let seals = fcntl_get_seals(&self.memory).map_err(|_| protocol_error("the grant memory is not a memfd"))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(protocol_error("the grant memory must be sealed against shrinking (F_SEAL_SHRINK)"));
        }
        let len = self.memory.metadata()?.len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) || len / PAGE_SIZE as u64 > MAX_GRANT_PAGES {
            return Err(protocol_error(format!(
                "grant memory of {len} bytes: must be 1 to {MAX_GRANT_PAGES} whole pages"
            )));
        }
        let pages = len / PAGE_SIZE as u64;
        let ring_pages = 1u64 << self.attach.ring_page_order;
        if u64::from(self.attach.ring_ref) + ring_pages > pages {
            return Err(protocol_error(format!(
                "ring pages {}..{} are not all granted ({pages} pages)",
                self.attach.ring_ref,
                u64::from(self.attach.ring_ref) + ring_pages
            )));
        }
        let ring = SharedMem::from_file(
            &self.memory,
            u64::from(self.attach.ring_ref) * PAGE_SIZE as u64,
            ring_pages as usize * PAGE_SIZE,
        )?;
        let grants = SharedMem::from_file(&self.memory, 0, len as usize)?;
        Ok((ring, grants))
    }
}

/// Reads the peer's handshake line (without the newline), all of it before `deadline`.
pub fn read_handshake_line(stream: &UnixStream, deadline: Instant) -> Result<String> {
    read_line(stream, Vec::new(), deadline)
}

/// Sends a handshake line with the grant memory's descriptor attached (`SCM_RIGHTS`): what a
/// frontend sends first.
pub fn send_with_fd(stream: &UnixStream, msg: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(protocol_error("cannot attach the memory descriptor"));
    }
    let sent = loop {
        match rustix::net::sendmsg(stream, &[IoSlice::new(msg)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    };
    let mut w = stream;
    w.write_all(&msg[sent..])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::fs::{MemfdFlags, fcntl_add_seals, memfd_create};

    use super::*;

    /// Sends an attach line with `file` as the grant memory and returns the backend's result.
    fn attach_with(file: &File, line: &str) -> (Result<SimBackend>, String) {
        let (front, back) = UnixStream::pair().unwrap();
        send_with_fd(&front, format!("{line}\n").as_bytes(), file.as_fd()).unwrap();
        let r = SimPending::read(back).and_then(|p| p.accept(&DiskInfo::new(1 << 20, false)));
        let reply = read_line(&front, Vec::new(), Instant::now() + HANDSHAKE_TIMEOUT).unwrap_or_default();
        (r, reply)
    }

    fn memfd(pages: u64, seals: SealFlags) -> File {
        let f = File::from(memfd_create("t", MemfdFlags::ALLOW_SEALING).unwrap());
        f.set_len(pages * PAGE_SIZE as u64).unwrap();
        fcntl_add_seals(&f, seals).unwrap();
        f
    }

    #[test]
    fn memory_must_be_sealed_and_hold_the_ring() {
        let (r, reply) = attach_with(&memfd(4, SealFlags::empty()), "vdi=a ring-ref=0");
        assert!(r.is_err() && reply.contains("sealed against shrinking"), "{reply}");
        let (r, reply) = attach_with(&memfd(4, SealFlags::SHRINK), "vdi=a ring-ref=3 ring-page-order=1");
        assert!(r.is_err() && reply.contains("not all granted"), "{reply}");
        let (r, reply) = attach_with(&memfd(4, SealFlags::SHRINK), "vdi=a ring-ref=2 ring-page-order=1");
        assert!(r.is_ok() && reply.starts_with("connected sectors=2048"), "{reply}");
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(4 * PAGE_SIZE as u64).unwrap();
        let (r, reply) = attach_with(&plain, "vdi=a ring-ref=0");
        // On a disk file system it is not tmpfs; on a tmpfs /tmp it carries no seals.
        assert!(r.is_err() && (reply.contains("not a memfd") || reply.contains("sealed")), "{reply}");
    }

    #[test]
    fn lines_round_trip_and_bad_ones_are_refused() {
        let a = Attach { vdi: "guest-1".into(), ring_ref: 3, ring_page_order: 2, protocol: Abi::X86_32 };
        assert_eq!(Attach::parse(&a.encode()).unwrap(), a);
        let d = DiskInfo::new(1 << 30, true);
        assert_eq!(DiskInfo::parse_reply(&d.encode()).unwrap(), d);
        assert!(matches!(DiskInfo::parse_reply("error no such VDI"), Err(Error::Refused(m)) if m == "no such VDI"));
        for bad in [
            "ring-ref=0",
            "vdi=a ring-ref=x",
            "vdi=a ring-ref=0 ring-page-order=5",
            "vdi=a ring-ref=0 protocol=arm-abi",
            "vdi=a vdi=b ring-ref=0",
            "vdi=a ring-ref=0 junk",
        ] {
            assert!(Attach::parse(bad).is_err(), "{bad}");
        }
    }
}
