//! The transmission phase: a reader parses requests and feeds a bounded worker pool; workers
//! execute them on the device and write replies, possibly out of order, under one lock.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use blockdev::{BlockDevice, DevError, ExtentKind};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, trace, warn};

use crate::handshake::{Session, read_exact_or_eof};
use crate::wire::{self, Request};
use crate::{Limits, NbdError};

/// Largest range one BLOCK_STATUS asks the device about; the reply may cover less than asked.
const BLOCK_STATUS_MAX_QUERY: u64 = 1 << 30;
/// Most descriptors sent in one BLOCK_STATUS reply.
const BLOCK_STATUS_MAX_EXTENTS: usize = 16 << 10;
/// Most content chunks in one structured READ reply; more extents are sent as one data chunk.
const READ_MAX_CHUNKS: usize = 1024;
/// Size of the zero buffer used when zeroes must really be written.
const ZERO_BUFFER: usize = 1 << 20;

/// An error reply: NBD error value and a message for structured replies.
struct Fail {
    errno: u32,
    message: String,
}

impl Fail {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Fail { errno, message: message.into() }
    }
}

impl From<DevError> for Fail {
    fn from(e: DevError) -> Self {
        Fail { errno: wire::nbd_errno(e.errno()), message: e.to_string() }
    }
}

/// One received request on its way to a worker.
struct Job {
    req: Request,
    payload: Vec<u8>,
    /// Arrival order, for flush ordering.
    seq: u64,
    /// Bytes of the connection's buffer budget this job holds.
    cost: u64,
    /// A write over the size limit whose payload was skipped: answered with EINVAL.
    oversized: bool,
}

fn is_write_like(typ: u16) -> bool {
    matches!(typ, wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_WRITE_ZEROES)
}

/// Bounds the requests in flight and the payload bytes they hold.
struct Budget {
    max_count: usize,
    max_bytes: u64,
    used: Mutex<(usize, u64)>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, bytes: u64) {
        let mut used = self.used.lock();
        while used.0 >= self.max_count || (used.1 > 0 && used.1 + bytes > self.max_bytes) {
            self.freed.wait(&mut used);
        }
        used.0 += 1;
        used.1 += bytes;
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock();
        used.0 -= 1;
        used.1 -= bytes;
        self.freed.notify_all();
    }
}

/// Sequence numbers of write-like requests received but not yet finished.
#[derive(Default)]
struct PendingWrites {
    seqs: Mutex<BTreeSet<u64>>,
    done: Condvar,
}

impl PendingWrites {
    fn start(&self, seq: u64) {
        self.seqs.lock().insert(seq);
    }

    fn finish(&self, seq: u64) {
        self.seqs.lock().remove(&seq);
        self.done.notify_all();
    }

    /// Waits until every write received before `seq` has finished.
    fn wait_before(&self, seq: u64) {
        let mut seqs = self.seqs.lock();
        while seqs.first().is_some_and(|&s| s < seq) {
            self.done.wait(&mut seqs);
        }
    }
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, W> {
    dev: &'a dyn BlockDevice,
    size: u64,
    read_only: bool,
    structured: bool,
    allocation_context: Option<u32>,
    max_request: u32,
    writer: Mutex<W>,
    /// Set once a reply could not be sent; nothing more is sent or read.
    broken: AtomicBool,
    write_error: Mutex<Option<io::Error>>,
    pending_writes: PendingWrites,
    budget: Budget,
    shut: &'a (dyn Fn() + Sync),
}

/// Serves requests until the client disconnects; in-flight requests always finish first.
pub(crate) fn serve<R: Read, W: Write + Send>(
    reader: &mut R,
    writer: W,
    session: &Session,
    limits: &Limits,
    shut: &(dyn Fn() + Sync),
) -> Result<(), NbdError> {
    let dev: &dyn BlockDevice = &*session.device;
    let conn = Conn {
        dev,
        size: dev.size(),
        read_only: dev.read_only(),
        structured: session.structured,
        allocation_context: session.allocation_context,
        max_request: limits.max_request_bytes,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
        write_error: Mutex::new(None),
        pending_writes: PendingWrites::default(),
        budget: Budget {
            max_count: limits.max_in_flight_per_conn,
            max_bytes: limits.max_buffered_bytes_per_conn,
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        },
        shut,
    };
    let (tx, rx) = crossbeam_channel::bounded::<Job>(limits.max_in_flight_per_conn);
    let read_result = thread::scope(|s| {
        let mut spawned = 0;
        for i in 0..limits.workers_per_conn {
            let rx = rx.clone();
            let conn = &conn;
            match thread::Builder::new().name(format!("nbd-worker-{i}")).spawn_scoped(s, move || conn.work(rx)) {
                Ok(_) => spawned += 1,
                Err(e) => warn!(error = %e, "could not start an NBD worker thread"),
            }
        }
        drop(rx);
        if spawned == 0 {
            return Err(NbdError::Io(io::Error::other("no worker thread could be started")));
        }
        conn.read_requests(reader, tx)
    });
    if let Some(e) = conn.write_error.lock().take() {
        return Err(NbdError::Io(e));
    }
    read_result
}

impl<W: Write + Send> Conn<'_, W> {
    /// The reader: parses requests and queues them until DISC, end of stream or a fatal error.
    fn read_requests<R: Read>(&self, reader: &mut R, tx: Sender<Job>) -> Result<(), NbdError> {
        let mut seq = 0u64;
        loop {
            let mut hdr = [0u8; wire::REQUEST_LEN];
            let got = read_exact_or_eof(reader, &mut hdr);
            if self.broken.load(Ordering::Acquire) {
                return Ok(());
            }
            if !got? {
                debug!("client closed the connection");
                return Ok(());
            }
            let req = Request::decode(&hdr)
                .map_err(|got| NbdError::BadMagic { expected: u64::from(wire::REQUEST_MAGIC), got: u64::from(got) })?;
            trace!(?req, "request");
            // A write over the limit: its payload is skipped so the stream stays in step, and
            // it is answered EINVAL (as qemu-nbd does) instead of closing on a client that
            // merely asked too much.
            let oversized = req.typ == wire::CMD_WRITE && req.len > self.max_request;
            let cost = match req.typ {
                wire::CMD_DISC => {
                    debug!("client sent NBD_CMD_DISC");
                    return Ok(());
                }
                wire::CMD_WRITE if !oversized => u64::from(req.len),
                wire::CMD_READ if req.len <= self.max_request => u64::from(req.len),
                _ => 0,
            };
            self.budget.acquire(cost);
            let mut payload = Vec::new();
            let received = if oversized {
                crate::handshake::discard(reader, u64::from(req.len))
            } else if req.typ == wire::CMD_WRITE {
                payload = vec![0u8; req.len as usize];
                reader.read_exact(&mut payload)
            } else {
                Ok(())
            };
            if let Err(e) = received {
                self.budget.release(cost);
                return Err(e.into());
            }
            if is_write_like(req.typ) {
                self.pending_writes.start(seq);
            }
            if tx.send(Job { req, payload, seq, cost, oversized }).is_err() {
                return Err(NbdError::Io(io::Error::other("all worker threads are gone")));
            }
            seq += 1;
        }
    }

    /// A worker: executes queued jobs until the queue is closed and empty.
    fn work(&self, rx: Receiver<Job>) {
        for job in rx {
            let outcome = catch_unwind(AssertUnwindSafe(|| self.execute(&job)));
            if is_write_like(job.req.typ) {
                self.pending_writes.finish(job.seq);
            }
            if outcome.is_err() {
                error!(?job.req, "request handler panicked; closing the connection");
                self.broken.store(true, Ordering::Release);
                (self.shut)();
            }
            self.budget.release(job.cost);
        }
    }

    fn execute(&self, job: &Job) {
        let r = &job.req;
        match r.typ {
            wire::CMD_READ => self.read(r),
            wire::CMD_WRITE if job.oversized => {
                let why = format!("write of {} bytes is over the limit of {}", r.len, self.max_request);
                self.reply_error(r, Fail::new(wire::EINVAL, why));
            }
            wire::CMD_WRITE => {
                let res = self.write(r, &job.payload);
                self.reply_status(r, res);
            }
            wire::CMD_FLUSH => {
                let res = self.check_flags(r, wire::CMD_FLAG_FUA).and_then(|()| {
                    self.pending_writes.wait_before(job.seq);
                    if self.read_only { Ok(()) } else { self.dev.flush().map_err(Fail::from) }
                });
                self.reply_status(r, res);
            }
            wire::CMD_TRIM => {
                let res = self.trim(r);
                self.reply_status(r, res);
            }
            wire::CMD_WRITE_ZEROES => {
                let res = self.write_zeroes(r);
                self.reply_status(r, res);
            }
            wire::CMD_BLOCK_STATUS => self.block_status(r),
            wire::CMD_CACHE => {
                let res = self.check_flags(r, wire::CMD_FLAG_FUA).and_then(|()| self.check_range(r, wire::EINVAL));
                self.reply_status(r, res);
            }
            other => self.reply_error(r, Fail::new(wire::EINVAL, format!("unknown command {other}"))),
        }
    }

    fn check_flags(&self, r: &Request, allowed: u16) -> Result<(), Fail> {
        if r.flags & !allowed != 0 {
            return Err(Fail::new(wire::EINVAL, format!("invalid flags {:#x} for command {}", r.flags, r.typ)));
        }
        Ok(())
    }

    fn check_range(&self, r: &Request, errno: u32) -> Result<(), Fail> {
        match r.offset.checked_add(u64::from(r.len)) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Fail::new(
                errno,
                format!("request {}+{} reaches past the end of the export ({} bytes)", r.offset, r.len, self.size),
            )),
        }
    }

    fn check_writable(&self) -> Result<(), Fail> {
        if self.read_only { Err(Fail::new(wire::EPERM, "the export is read-only")) } else { Ok(()) }
    }

    fn write(&self, r: &Request, data: &[u8]) -> Result<(), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA)?;
        self.check_writable()?;
        self.check_range(r, wire::ENOSPC)?;
        let fua = r.flags & wire::CMD_FLAG_FUA != 0;
        Ok(self.dev.write_at(r.offset, data, fua)?)
    }

    fn trim(&self, r: &Request) -> Result<(), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA)?;
        self.check_writable()?;
        self.check_range(r, wire::EINVAL)?;
        match self.dev.discard(r.offset, u64::from(r.len)) {
            // TRIM is only a hint.
            Ok(()) | Err(DevError::Unsupported(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if r.flags & wire::CMD_FLAG_FUA != 0 {
            self.dev.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, r: &Request) -> Result<(), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO)?;
        self.check_writable()?;
        self.check_range(r, wire::ENOSPC)?;
        let fast = r.flags & wire::CMD_FLAG_FAST_ZERO != 0;
        let no_hole = r.flags & wire::CMD_FLAG_NO_HOLE != 0;
        let fua = r.flags & wire::CMD_FLAG_FUA != 0;
        let (offset, len) = (r.offset, u64::from(r.len));
        if no_hole {
            if fast {
                return Err(Fail::new(wire::ENOTSUP, "zeroing without holes is not faster than writing"));
            }
            return Ok(self.write_zero_buffers(offset, len, fua)?);
        }
        match self.dev.write_zeroes(offset, len) {
            Ok(()) => {}
            Err(DevError::Unsupported(_)) if fast => {
                return Err(Fail::new(wire::ENOTSUP, "fast zeroing is not supported"));
            }
            Err(DevError::Unsupported(_)) => return Ok(self.write_zero_buffers(offset, len, fua)?),
            Err(e) => return Err(e.into()),
        }
        if fua {
            self.dev.flush()?;
        }
        Ok(())
    }

    /// Writes real zero bytes over the range, in bounded pieces.
    fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> Result<(), DevError> {
        let zeros = vec![0u8; len.min(ZERO_BUFFER as u64) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_BUFFER as u64) as usize;
            self.dev.write_at(offset + done, &zeros[..n], fua)?;
            done += n as u64;
        }
        Ok(())
    }

    fn read(&self, r: &Request) {
        let allowed = wire::CMD_FLAG_FUA | if self.structured { wire::CMD_FLAG_DF } else { 0 };
        let checked = self.check_flags(r, allowed).and_then(|()| {
            if r.len > self.max_request {
                return Err(Fail::new(
                    wire::EINVAL,
                    format!("read of {} bytes exceeds the {}-byte maximum", r.len, self.max_request),
                ));
            }
            self.check_range(r, wire::EINVAL)
        });
        if let Err(f) = checked {
            return self.reply_error(r, f);
        }
        let len = r.len as usize;
        if !self.structured {
            let mut buf = vec![0u8; wire::SIMPLE_REPLY_LEN + len];
            match self.dev.read_at(r.offset, &mut buf[wire::SIMPLE_REPLY_LEN..]) {
                Ok(()) => {
                    wire::put_simple_reply(&mut buf, 0, r.handle);
                    self.send(&[&buf]);
                }
                Err(e) => self.reply_error(r, e.into()),
            }
            return;
        }
        if len == 0 {
            return self.send(&[&wire::chunk(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, r.handle, &[])]);
        }
        let extents = if r.flags & wire::CMD_FLAG_DF != 0 { None } else { self.read_extents(r) };
        let extents = extents.unwrap_or_else(|| vec![(r.offset, u64::from(r.len), false)]);
        let mut chunks = Vec::with_capacity(extents.len());
        for (offset, len, hole) in extents {
            if hole {
                chunks.push(wire::hole_chunk(0, r.handle, offset, len as u32));
                continue;
            }
            let head = wire::CHUNK_HEADER_LEN + 8;
            let mut buf = vec![0u8; head + len as usize];
            if let Err(e) = self.dev.read_at(offset, &mut buf[head..]) {
                return self.reply_error(r, e.into());
            }
            wire::put_chunk_header(&mut buf, 0, wire::REPLY_TYPE_OFFSET_DATA, r.handle, (len + 8) as u32);
            buf[wire::CHUNK_HEADER_LEN..head].copy_from_slice(&offset.to_be_bytes());
            chunks.push(buf);
        }
        if let Some(last) = chunks.last_mut() {
            last[4..6].copy_from_slice(&wire::REPLY_FLAG_DONE.to_be_bytes());
        }
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        self.send(&parts);
    }

    /// The request's range as (offset, length, is_hole) runs, if the device reports a sane
    /// allocation map with not too many runs.
    fn read_extents(&self, r: &Request) -> Option<Vec<(u64, u64, bool)>> {
        let extents = self.dev.extents(r.offset, u64::from(r.len)).ok()?;
        if extents.len() > READ_MAX_CHUNKS {
            return None;
        }
        let mut pos = r.offset;
        let mut out: Vec<(u64, u64, bool)> = Vec::with_capacity(extents.len());
        for e in extents {
            if e.offset != pos || e.len == 0 {
                return None;
            }
            pos = pos.checked_add(e.len)?;
            let hole = e.kind == ExtentKind::Hole;
            match out.last_mut() {
                Some(last) if last.2 == hole => last.1 += e.len,
                _ => out.push((e.offset, e.len, hole)),
            }
        }
        (pos == r.offset + u64::from(r.len)).then_some(out)
    }

    fn block_status(&self, r: &Request) {
        match self.block_status_extents(r) {
            Ok((context, extents)) => self.send(&[&wire::block_status_chunk(r.handle, context, &extents)]),
            Err(f) => self.reply_error(r, f),
        }
    }

    fn block_status_extents(&self, r: &Request) -> Result<(u32, Vec<(u32, u32)>), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA | wire::CMD_FLAG_REQ_ONE)?;
        let Some(context) = self.allocation_context.filter(|_| self.structured) else {
            return Err(Fail::new(wire::EINVAL, "no metadata context was negotiated"));
        };
        if r.len == 0 {
            return Err(Fail::new(wire::EINVAL, "block status of an empty range"));
        }
        self.check_range(r, wire::EINVAL)?;
        let query = u64::from(r.len).min(BLOCK_STATUS_MAX_QUERY);
        let end = r.offset + query;
        let extents = match self.dev.extents(r.offset, query) {
            Ok(e) => e,
            // "Allocated, contents unknown" is always a correct answer.
            Err(DevError::Unsupported(_)) => return Ok((context, vec![(query as u32, 0)])),
            Err(e) => return Err(e.into()),
        };
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = r.offset;
        for e in extents {
            // Clip to the part of the query not yet described; stop at any gap.
            let e_end = e.offset.saturating_add(e.len).min(end);
            if e.offset > pos || e_end <= pos {
                if e.offset > pos {
                    break;
                }
                continue;
            }
            let len = (e_end - pos) as u32;
            let flags = match e.kind {
                ExtentKind::Hole => wire::STATE_HOLE | wire::STATE_ZERO,
                ExtentKind::Data => 0,
            };
            if let Some(last) = out.last_mut()
                && last.1 == flags
            {
                last.0 += len;
            } else if out.len() < BLOCK_STATUS_MAX_EXTENTS {
                out.push((len, flags));
            } else {
                break;
            }
            pos = e_end;
            if pos == end {
                break;
            }
        }
        if out.is_empty() {
            out.push((query as u32, 0));
        }
        if r.flags & wire::CMD_FLAG_REQ_ONE != 0 {
            out.truncate(1);
        }
        Ok((context, out))
    }

    fn reply_status(&self, r: &Request, res: Result<(), Fail>) {
        match res {
            Ok(()) => self.send(&[&wire::simple_reply(0, r.handle)]),
            Err(f) => self.reply_error(r, f),
        }
    }

    fn reply_error(&self, r: &Request, f: Fail) {
        debug!(handle = r.handle, typ = r.typ, errno = f.errno, message = %f.message, "request failed");
        if self.structured {
            self.send(&[&wire::error_chunk(r.handle, f.errno, &f.message)]);
        } else {
            self.send(&[&wire::simple_reply(f.errno, r.handle)]);
        }
    }

    /// Sends one reply (all its parts back to back); on failure marks the connection broken.
    fn send(&self, parts: &[&[u8]]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writer.lock();
        let res = parts.iter().try_for_each(|p| w.write_all(p)).and_then(|()| w.flush());
        drop(w);
        if let Err(e) = res {
            warn!(error = %e, "could not send a reply; closing the connection");
            if !self.broken.swap(true, Ordering::AcqRel) {
                *self.write_error.lock() = Some(e);
            }
            (self.shut)();
        }
    }
}
