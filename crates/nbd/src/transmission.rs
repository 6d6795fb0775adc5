//! The transmission phase: a reader parses requests and feeds a bounded worker pool; workers
//! execute them on the device and write replies, possibly out of order, under one lock. A
//! small WRITE to a device whose writes land in memory the reader runs itself: handing it to a
//! worker (a wake-up and a context switch) would cost more than the write.

use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use blockdev::{BlockDevice, DevError, ExtentKind, TryRead};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, trace, warn};

use crate::buffers::{Buffer, BufferPool, Held};
use crate::handshake::{Session, read_exact_or_eof};
use crate::room::wait_for_room;
use crate::stream::RequestSource;
use crate::wire::{self, ReplyTo, Request};
use crate::{Limits, NbdError};

/// Largest range one BLOCK_STATUS asks the device about; the reply may cover less than asked.
/// Compact replies carry 32-bit lengths; extended ones may describe more at once.
const BLOCK_STATUS_MAX_QUERY: u64 = 1 << 30;
/// Extended replies could describe more, but the device lists every extent of the range first
/// (a fragmented 64 GiB would be millions): the same bound for both.
const BLOCK_STATUS_MAX_QUERY_EXTENDED: u64 = BLOCK_STATUS_MAX_QUERY;
/// Most descriptors sent in one BLOCK_STATUS reply.
const BLOCK_STATUS_MAX_EXTENTS: usize = 16 << 10;
/// Most content chunks in one structured READ reply; more extents are sent as one data chunk.
const READ_MAX_CHUNKS: usize = 1024;
/// Size of the zero buffer used when zeroes must really be written.
const ZERO_BUFFER: usize = 1 << 20;
/// Most bytes of one READ held in memory at once: a longer read is read and sent piece by
/// piece, so a client that stops taking its replies pins at most this much per worker.
pub(crate) const READ_PIECE: u64 = 1 << 20;

/// Most bytes of replies the reader batches (see [`Conn::send_with`]): well inside the
/// stream's write buffer, so a batch never reaches the socket until it is sent whole — the
/// reply deadline ([`crate::stream`]'s writer) then bounds the batch as one reply.
const BATCH_BYTES: usize = crate::stream::STREAM_BUFFER / 2;

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
    payload: Buffer,
    /// The request's share of the daemon-wide pool: a WRITE's payload (given back once it is
    /// written), or the one piece a READ is read into (reserved here, so a worker never waits
    /// for the pool: waiting workers could be the only ones able to run the queued writes that
    /// hold it).
    held: Option<Held>,
    /// Arrival order, for flush ordering.
    seq: u64,
    /// Bytes of the connection's buffer budget this job holds.
    cost: u64,
    /// A READ holding one of the connection's read slots (see [`Conn::read_slots`]).
    read_slot: bool,
    /// Why a payload was skipped instead of read (a write over the size limit or to a
    /// read-only export, or a payload on a command that takes none): the request's answer.
    skipped: Option<Fail>,
}

fn is_write_like(typ: u16) -> bool {
    matches!(typ, wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_WRITE_ZEROES)
}

/// The requests the reader has received, waiting for a worker. Its length is bounded by the
/// connection's [`Budget`], taken before a job is queued. An idle worker parks at once: a
/// channel that spins and yields before parking (crossbeam's did: `sched_yield` was ~6% of
/// the daemon's CPU under fio randwrite at QD16) takes the CPU the reader and the guests need
/// on a small host.
#[derive(Default)]
struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// No more jobs will come: workers finish the queued ones and return.
    closed: bool,
}

impl JobQueue {
    fn push(&self, job: Job) {
        self.state.lock().jobs.push_back(job);
        self.ready.notify_one();
    }

    /// The next job, waiting for one; `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut s = self.state.lock();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                return Some(job);
            }
            if s.closed {
                return None;
            }
            self.ready.wait(&mut s);
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }

    /// Takes the FLUSHes at the front of the queue, up to the first other job: one commit
    /// answers them all. Only from the front: a FLUSH behind a queued write must not be taken
    /// ahead of it (the write would then wait for a worker that waits for it).
    fn pop_flushes(&self) -> Vec<Job> {
        let mut s = self.state.lock();
        let mut flushes = Vec::new();
        while s.jobs.front().is_some_and(is_plain_flush) {
            flushes.extend(s.jobs.pop_front());
        }
        flushes
    }
}

/// A FLUSH that asks for a flush (not one answered with an error whatever happens).
fn is_plain_flush(job: &Job) -> bool {
    job.req.typ == wire::CMD_FLUSH && job.skipped.is_none()
}

/// Closes the queue when the reader is done, however it ends (a panic included: the workers
/// must not wait for jobs forever, or the connection's scope would never end).
struct CloseOnDrop<'a>(&'a JobQueue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Bounds the requests in flight and the payload bytes they hold.
struct Budget {
    max_count: usize,
    max_bytes: u64,
    used: Mutex<(usize, u64)>,
    freed: Condvar,
}

impl Budget {
    /// Takes a request's place and `bytes`, waiting while they would go past the bounds;
    /// `before_wait` runs (without this lock) before the first wait, if there is one.
    fn acquire_or(&self, bytes: u64, before_wait: impl FnOnce()) {
        let mut used = self.used.lock();
        let (max_count, max_bytes) = (self.max_count, self.max_bytes);
        let full = |u: &(usize, u64)| u.0 >= max_count || (u.1 > 0 && u.1 + bytes > max_bytes);
        wait_for_room(&mut used, &self.freed, full, before_wait);
        used.0 += 1;
        used.1 += bytes;
    }

    /// Requests holding a place now.
    fn in_flight(&self) -> usize {
        self.used.lock().0
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

thread_local! {
    /// Set on a connection's reader while it runs a request with more of the client's bytes
    /// already received: the request's reply may wait for the others' ([`Conn::send_with`]).
    static REPLIES_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the reader's replies join its batch (if `start` was given true); over when
/// dropped, also by a panic.
struct ReplyBatch;

impl ReplyBatch {
    fn start(batch: bool) -> ReplyBatch {
        REPLIES_WAIT.set(batch);
        ReplyBatch
    }
}

impl Drop for ReplyBatch {
    fn drop(&mut self) {
        REPLIES_WAIT.set(false);
    }
}

/// The reader's request source: before it blocks for more of the client's bytes (nothing left
/// in the receive buffer), the replies batched so far are sent — the client may be waiting
/// for them before it sends more. The time that takes is not the client's: a payload's
/// deadline moves on by it.
struct SendsBeforeBlocking<'r, 'c, 'a, R, W> {
    inner: &'r mut R,
    conn: &'c Conn<'a, W>,
    /// The deadline last set.
    deadline: Option<Instant>,
}

impl<R: RequestSource, W: Write + Send> Read for SendsBeforeBlocking<'_, '_, '_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.inner.has_buffered() {
            if self.conn.unsent.load(Ordering::Acquire) > 0 {
                let began = Instant::now();
                self.conn.send_unsent();
                if let Some(d) = self.deadline {
                    self.set_deadline(Some(d + began.elapsed()));
                }
            }
            // In the middle of a request (a payload) or with every earlier request answered,
            // the client's next bytes may come at once; with requests still on workers, a
            // client at queue depth 1 sends nothing until it has their replies.
            let may_poll = self.deadline.is_some() || self.conn.budget.in_flight() == 0;
            self.inner.set_may_poll(may_poll);
        }
        self.inner.read(buf)
    }
}

impl<R: RequestSource, W: Write + Send> RequestSource for SendsBeforeBlocking<'_, '_, '_, R, W> {
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        self.inner.set_deadline(deadline);
    }
    fn has_buffered(&self) -> bool {
        self.inner.has_buffered()
    }
    fn polls(&self) -> bool {
        self.inner.polls()
    }
    fn set_may_poll(&mut self, may: bool) {
        self.inner.set_may_poll(may);
    }
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, W> {
    dev: &'a dyn BlockDevice,
    size: u64,
    read_only: bool,
    structured: bool,
    /// Extended headers: 32-byte requests and reply headers, 64-bit lengths.
    extended: bool,
    allocation_context: Option<u32>,
    max_request: u32,
    /// WRITEs without FUA up to this length run on the reader (0: none do).
    inline_write_max: u64,
    /// READs up to this length are tried on the reader, served there if the device needs no
    /// wait for them (0: none are).
    inline_read_max: u64,
    /// Time a request's payload has to arrive once its header has.
    payload_timeout: std::time::Duration,
    /// The daemon-wide bound on payload bytes held.
    pool: &'a BufferPool,
    writer: Mutex<W>,
    /// Bytes of the reader's batch in the writer's buffer, not yet sent (see
    /// [`Conn::send_with`]): all the buffer holds, as every other reply is flushed. Changed
    /// only with `writer` locked.
    unsent: AtomicUsize,
    /// Set once a reply could not be sent; nothing more is sent or read.
    broken: AtomicBool,
    write_error: Mutex<Option<io::Error>>,
    pending_writes: PendingWrites,
    budget: Budget,
    /// READs holding a piece of the pool at once: as many as there are workers.
    read_slots: Budget,
    shut: &'a (dyn Fn() + Sync),
}

/// Serves requests until the client disconnects; in-flight requests always finish first.
pub(crate) fn serve<R: RequestSource, W: Write + Send>(
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
        extended: session.extended,
        allocation_context: session.allocation_context,
        max_request: limits.max_request_bytes,
        inline_write_max: if dev.writes_land_in_memory() { u64::from(limits.inline_write_max) } else { 0 },
        inline_read_max: u64::from(limits.inline_read_max),
        payload_timeout: limits.reply_timeout,
        pool: &limits.buffers,
        writer: Mutex::new(writer),
        unsent: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
        write_error: Mutex::new(None),
        pending_writes: PendingWrites::default(),
        budget: Budget {
            max_count: limits.max_in_flight_per_conn,
            max_bytes: limits.max_buffered_bytes_per_conn,
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        },
        read_slots: Budget {
            max_count: limits.workers_per_conn,
            max_bytes: u64::MAX,
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        },
        shut,
    };
    let queue = JobQueue::default();
    let read_result = thread::scope(|s| {
        let closer = CloseOnDrop(&queue);
        let mut spawned = 0;
        for i in 0..limits.workers_per_conn {
            let (conn, queue) = (&conn, &queue);
            match thread::Builder::new().name(format!("nbd-worker-{i}")).spawn_scoped(s, move || conn.work(queue)) {
                Ok(_) => spawned += 1,
                Err(e) => warn!(error = %e, "could not start an NBD worker thread"),
            }
        }
        if spawned == 0 {
            return Err(NbdError::Io(io::Error::other("no worker thread could be started")));
        }
        let r = conn.read_requests(reader, &queue);
        drop(closer);
        r
    });
    if let Some(e) = conn.write_error.lock().take() {
        return Err(NbdError::Io(e));
    }
    read_result
}

impl<W: Write + Send> Conn<'_, W> {
    /// The reader: parses requests and queues them until DISC, end of stream or a fatal error.
    fn read_requests<R: RequestSource>(&self, reader: &mut R, queue: &JobQueue) -> Result<(), NbdError> {
        let outcome =
            self.read_requests_from(&mut SendsBeforeBlocking { inner: reader, conn: self, deadline: None }, queue);
        // Replies batched before a DISC or an error still go out.
        self.send_unsent();
        outcome
    }

    /// [`Conn::read_requests`] from a source that sends the batched replies before it blocks.
    fn read_requests_from<R: RequestSource>(&self, reader: &mut R, queue: &JobQueue) -> Result<(), NbdError> {
        let header_len = if self.extended { wire::EXTENDED_REQUEST_LEN } else { wire::REQUEST_LEN };
        let mut seq = 0u64;
        loop {
            let mut hdr = [0u8; wire::EXTENDED_REQUEST_LEN];
            let got = read_exact_or_eof(reader, &mut hdr[..header_len]);
            if self.broken.load(Ordering::Acquire) {
                return Ok(());
            }
            if !got? {
                debug!("client closed the connection");
                return Ok(());
            }
            let req = self.decode(&hdr)?;
            trace!(?req, "request");
            if req.typ == wire::CMD_DISC {
                debug!("client sent NBD_CMD_DISC");
                return Ok(());
            }
            // A WRITE carries its length in payload; with extended headers any command may
            // announce one. A payload this server will not take (a write over the limit, data
            // on a command that takes none) is skipped so the stream stays in step, and the
            // request is answered EINVAL (as qemu-nbd does) instead of closing on the client.
            let has_payload =
                req.typ == wire::CMD_WRITE || (self.extended && req.flags & wire::CMD_FLAG_PAYLOAD_LEN != 0);
            let skipped = if !has_payload {
                None
            } else if req.typ != wire::CMD_WRITE {
                Some(Fail::new(wire::EINVAL, format!("command {} takes no payload", req.typ)))
            } else if req.len > u64::from(self.max_request) {
                Some(Fail::new(
                    wire::EINVAL,
                    format!("write of {} bytes is over the limit of {}", req.len, self.max_request),
                ))
            } else if self.read_only {
                Some(Fail::new(wire::EPERM, "the export is read-only"))
            } else {
                None
            };
            if skipped.is_none()
                && (reader.has_buffered() || reader.polls())
                && self.read_on_reader(&req, ReplyBatch::start(reader.has_buffered()))
            {
                seq += 1;
                continue;
            }
            let cost = if has_payload && skipped.is_none() { req.len } else { 0 };
            self.budget.acquire_or(cost, || self.send_unsent());
            let mut held = None;
            let read_slot = req.typ == wire::CMD_READ && req.len <= u64::from(self.max_request);
            if read_slot {
                // At most one read per worker holds a piece: a client queueing many reads
                // waits here (its requests stay in its socket) instead of reserving the pool.
                self.read_slots.acquire_or(0, || self.send_unsent());
                held = Some(self.pool.take_or(req.len.min(READ_PIECE), || self.send_unsent()));
            }
            let mut payload = Buffer::empty();
            let received = if has_payload {
                // A payload must arrive in time, whether it is kept or skipped.
                let r = if skipped.is_some() {
                    reader.set_deadline(Some(Instant::now() + self.payload_timeout));
                    crate::handshake::discard(reader, req.len)
                } else {
                    self.read_payload(reader, cost, &mut payload, &mut held)
                };
                reader.set_deadline(None);
                r
            } else {
                Ok(())
            };
            if let Err(e) = received {
                self.budget.release(cost);
                if read_slot {
                    self.read_slots.release(0);
                }
                return Err(e.into());
            }
            if is_write_like(req.typ) {
                self.pending_writes.start(seq);
            }
            let job = Job { req, payload, held, seq, cost, read_slot, skipped };
            if self.runs_on_reader(&job) {
                let _batch = ReplyBatch::start(reader.has_buffered());
                self.run(job);
            } else {
                queue.push(job);
            }
            seq += 1;
        }
    }

    /// Reads a payload of `len` bytes a piece at a time, taking each piece's bytes from the pool
    /// as it arrives: a client that stops half-way holds only what it sent. Each piece must
    /// arrive within the payload timeout of the moment its bytes were granted (time spent
    /// waiting for the pool is not the client's).
    fn read_payload<R: RequestSource>(
        &self,
        reader: &mut R,
        len: u64,
        payload: &mut Buffer,
        held: &mut Option<Held>,
    ) -> io::Result<()> {
        // A reused buffer holds an earlier request's bytes: every one is read over below, or
        // the connection ends and the job is never run. A payload too long to reuse grows a
        // piece at a time as its bytes arrive, as the pool's takes do.
        let reused = self.pool.reuses(len as usize);
        let mut grown = Vec::new();
        if reused {
            *payload = self.pool.buffer(len as usize);
        } else {
            grown.reserve_exact(len as usize);
        }
        let mut done = 0usize;
        while (done as u64) < len {
            let n = (len - done as u64).min(READ_PIECE) as usize;
            let piece = self.pool.take_or(n as u64, || self.send_unsent());
            match held {
                Some(h) => h.absorb(piece),
                None => *held = Some(piece),
            }
            reader.set_deadline(Some(Instant::now() + self.payload_timeout));
            if reused {
                reader.read_exact(&mut payload[done..done + n])?;
            } else {
                grown.resize(done + n, 0);
                reader.read_exact(&mut grown[done..])?;
            }
            done += n;
        }
        if !reused {
            *payload = Buffer::from(grown);
        }
        Ok(())
    }

    /// Decodes a request header of the negotiated kind.
    fn decode(&self, hdr: &[u8; wire::EXTENDED_REQUEST_LEN]) -> Result<Request, NbdError> {
        let (decoded, expected) = if self.extended {
            (Request::decode_extended(hdr), wire::EXTENDED_REQUEST_MAGIC)
        } else {
            let mut compact = [0u8; wire::REQUEST_LEN];
            compact.copy_from_slice(&hdr[..wire::REQUEST_LEN]);
            (Request::decode(&compact), wire::REQUEST_MAGIC)
        };
        decoded.map_err(|got| NbdError::BadMagic { expected: u64::from(expected), got: u64::from(got) })
    }

    /// Where the replies to `r` go.
    fn reply_to(&self, r: &Request) -> ReplyTo {
        ReplyTo { handle: r.handle, offset: r.offset, extended: self.extended }
    }

    /// True if the reader runs `job` itself: a WRITE small enough, without FUA (which waits
    /// for a commit), to a device whose writes land in memory. Everything else, and anything
    /// that may wait for a medium, goes to the workers so the reader keeps reading.
    fn runs_on_reader(&self, job: &Job) -> bool {
        job.req.typ == wire::CMD_WRITE
            && job.skipped.is_none()
            && job.req.flags & wire::CMD_FLAG_FUA == 0
            && job.req.len <= self.inline_write_max
    }

    /// Serves READ `r` on the reader if it is short, valid and the device has its bytes
    /// without waiting ([`BlockDevice::try_read_at`]); false leaves it to a worker, which
    /// also answers every error. Its buffer is taken from the daemon-wide pool like any
    /// read's. A panic closes the connection, as on a worker.
    fn read_on_reader(&self, r: &Request, _batch: ReplyBatch) -> bool {
        match catch_unwind(AssertUnwindSafe(|| self.try_read_inline(r))) {
            Ok(served) => served,
            Err(_) => {
                error!(req = ?r, "read on the reader panicked; closing the connection");
                self.broken.store(true, Ordering::Release);
                (self.shut)();
                true
            }
        }
    }

    /// [`Conn::read_on_reader`] without the panic guard.
    fn try_read_inline(&self, r: &Request) -> bool {
        if r.typ != wire::CMD_READ || r.len == 0 || r.len > self.inline_read_max {
            return false;
        }
        let allowed = wire::CMD_FLAG_FUA | if self.structured { wire::CMD_FLAG_DF } else { 0 };
        if self.check_flags(r, allowed).is_err() || self.check_range(r, wire::EINVAL).is_err() {
            return false;
        }
        let _held = self.pool.take_or(r.len, || self.send_unsent());
        self.serve_at_hand(r)
    }

    /// Answers READ `r` (its flags and range already checked, its bytes taken from the pool)
    /// from one [`BlockDevice::try_read_at`]: the extents and the bytes from the same lookups.
    /// False, with nothing sent, if the device would have to wait or the answer does not map
    /// the request.
    fn serve_at_hand(&self, r: &Request) -> bool {
        // Left over from an earlier request until `try_read_at` fills it; not sent unless it did.
        let mut data = self.pool.buffer(r.len as usize);
        let extents = match self.dev.try_read_at(r.offset, &mut data) {
            Ok(TryRead::Done(extents)) => extents,
            Ok(TryRead::WouldWait) | Err(_) => return false,
        };
        if !self.structured {
            self.send(&[&wire::simple_reply(0, r.handle), &data]);
            return true;
        }
        let to = self.reply_to(r);
        // One chunk per run, as a worker's reply has (holes as hole chunks, unless the client
        // asked for one chunk); the data chunks' bytes are sent from `data` as they are.
        let runs: Vec<(u64, u64, bool)> = if r.flags & wire::CMD_FLAG_DF != 0 {
            vec![(r.offset, r.len, false)]
        } else {
            extents.iter().map(|e| (e.offset, e.len, e.kind == ExtentKind::Hole)).collect()
        };
        let covered = runs.len() <= READ_MAX_CHUNKS
            && runs.iter().all(|run| run.1 > 0)
            && runs.first().is_some_and(|f| f.0 == r.offset)
            && runs.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0)
            && runs.last().is_some_and(|l| l.0 + l.1 == r.offset + r.len);
        if !covered {
            // Not a map of the request: a worker answers it the long way.
            return false;
        }
        let last = runs.len() - 1;
        let heads: Vec<Vec<u8>> = runs
            .iter()
            .enumerate()
            .map(|(i, &(offset, len, hole))| {
                let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
                if hole {
                    return to.hole(flags, offset, len as u32);
                }
                let mut head = vec![0u8; to.data_head_len()];
                to.put_data_head(&mut head, flags, offset, len);
                head
            })
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * runs.len());
        for (head, &(offset, len, hole)) in heads.iter().zip(&runs) {
            parts.push(head);
            if !hole {
                let at = (offset - r.offset) as usize;
                parts.push(&data[at..at + len as usize]);
            }
        }
        self.send(&parts);
        true
    }

    /// A worker: executes queued jobs until the queue is closed and empty.
    fn work(&self, queue: &JobQueue) {
        while let Some(job) = queue.pop() {
            if is_plain_flush(&job) {
                // FLUSHes queued together share one commit: a FLUSH waiting for a worker
                // while the others each waited for their own commit took tens of
                // milliseconds once writes stopped queueing (they run on the reader).
                let mut flushes = vec![job];
                flushes.extend(queue.pop_flushes());
                self.run_flushes(flushes);
            } else {
                self.run(job);
            }
        }
    }

    /// [`Conn::flush_and_reply`] for FLUSHes taken together; a panic closes the connection.
    fn run_flushes(&self, flushes: Vec<Job>) {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.flush_and_reply(&flushes)));
        if outcome.is_err() {
            error!(flushes = flushes.len(), "flush handler panicked; closing the connection");
            self.broken.store(true, Ordering::Release);
            (self.shut)();
        }
        for job in &flushes {
            self.budget.release(job.cost);
        }
    }

    /// Executes one job and gives back what it holds; a panic closes the connection.
    fn run(&self, job: Job) {
        let (req, seq, cost, read_slot) = (job.req, job.seq, job.cost, job.read_slot);
        let outcome = catch_unwind(AssertUnwindSafe(|| self.execute(job)));
        if is_write_like(req.typ) {
            self.pending_writes.finish(seq);
        }
        if outcome.is_err() {
            error!(?req, "request handler panicked; closing the connection");
            self.broken.store(true, Ordering::Release);
            (self.shut)();
        }
        self.budget.release(cost);
        if read_slot {
            self.read_slots.release(0);
        }
    }

    fn execute(&self, job: Job) {
        let r = &job.req;
        if let Some(fail) = job.skipped {
            return self.reply_error(r, fail);
        }
        match r.typ {
            // The piece it is read into was reserved by the reader (`job.held`).
            wire::CMD_READ => self.read(r),
            wire::CMD_WRITE => {
                let res = self.write(r, &job.payload);
                // The data is on the device: its memory goes back before the reply, which a
                // client that is slow to read may hold up.
                drop((job.payload, job.held));
                self.reply_status(r, res);
            }
            wire::CMD_FLUSH => self.flush_and_reply(std::slice::from_ref(&job)),
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

    /// Answers FLUSHes received in this order with one flush of the device, made once every
    /// write received before the last of them has finished.
    fn flush_and_reply(&self, flushes: &[Job]) {
        let checked: Vec<Result<(), Fail>> =
            flushes.iter().map(|j| self.check_flags(&j.req, wire::CMD_FLAG_FUA)).collect();
        let last_wanted = flushes.iter().zip(&checked).filter(|(_, c)| c.is_ok()).map(|(j, _)| j.seq).next_back();
        let flushed = match last_wanted {
            None => Ok(()),
            Some(seq) => {
                self.pending_writes.wait_before(seq);
                if self.read_only { Ok(()) } else { self.dev.flush().map_err(Fail::from) }
            }
        };
        for (job, check) in flushes.iter().zip(checked) {
            let res = check.and_then(|()| match &flushed {
                Ok(()) => Ok(()),
                Err(f) => Err(Fail::new(f.errno, f.message.clone())),
            });
            self.reply_status(&job.req, res);
        }
    }

    fn check_flags(&self, r: &Request, allowed: u16) -> Result<(), Fail> {
        if r.flags & !allowed != 0 {
            return Err(Fail::new(wire::EINVAL, format!("invalid flags {:#x} for command {}", r.flags, r.typ)));
        }
        Ok(())
    }

    fn check_range(&self, r: &Request, errno: u32) -> Result<(), Fail> {
        match r.offset.checked_add(r.len) {
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
        self.check_flags(r, wire::CMD_FLAG_FUA | self.payload_flag())?;
        self.check_writable()?;
        self.check_range(r, wire::ENOSPC)?;
        let fua = r.flags & wire::CMD_FLAG_FUA != 0;
        Ok(self.dev.write_at(r.offset, data, fua)?)
    }

    fn trim(&self, r: &Request) -> Result<(), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA)?;
        self.check_writable()?;
        self.check_range(r, wire::EINVAL)?;
        match self.dev.discard(r.offset, r.len) {
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
        let (offset, len) = (r.offset, r.len);
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

    /// `NBD_CMD_FLAG_PAYLOAD_LEN` where it may appear (on WRITE, with extended headers).
    fn payload_flag(&self) -> u16 {
        if self.extended { wire::CMD_FLAG_PAYLOAD_LEN } else { 0 }
    }

    fn read(&self, r: &Request) {
        let allowed = wire::CMD_FLAG_FUA | if self.structured { wire::CMD_FLAG_DF } else { 0 };
        let checked = self.check_flags(r, allowed).and_then(|()| {
            if r.len > u64::from(self.max_request) {
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
        // The common short read, when the device has it at hand: one lookup serves the chunk
        // map and the bytes (the path below looks the range up twice). Its piece of the pool
        // was reserved by the reader. `inline_read_max` 0 turns every such attempt off.
        if self.inline_read_max > 0 && r.len > 0 && r.len <= READ_PIECE && self.serve_at_hand(r) {
            return;
        }
        if !self.structured {
            let head = wire::simple_reply(0, r.handle);
            if let Err(f) = self.send_read(&head, r.offset, r.len) {
                self.reply_error(r, f);
            }
            return;
        }
        let to = self.reply_to(r);
        if r.len == 0 {
            return self.send(&[&to.done()]);
        }
        if r.flags & wire::CMD_FLAG_DF != 0 && r.len > READ_PIECE {
            // "Don't fragment": one data chunk, its bytes still read a piece at a time.
            let mut head = vec![0u8; to.data_head_len()];
            to.put_data_head(&mut head, wire::REPLY_FLAG_DONE, r.offset, r.len);
            if let Err(f) = self.send_read(&head, r.offset, r.len) {
                self.reply_error(r, f);
            }
            return;
        }
        let extents = if r.flags & wire::CMD_FLAG_DF != 0 { None } else { self.read_extents(r) };
        let extents = extents.unwrap_or_else(|| vec![(r.offset, r.len, false)]);
        if r.len <= READ_PIECE {
            // The common case: every chunk built, then sent at once.
            let mut chunks: Vec<Buffer> = Vec::with_capacity(extents.len());
            for (offset, len, hole) in extents {
                if hole {
                    chunks.push(to.hole(0, offset, len as u32).into());
                    continue;
                }
                match self.data_chunk(&to, 0, offset, len) {
                    Ok(c) => chunks.push(c),
                    Err(f) => return self.reply_error(r, f),
                }
            }
            if let Some(last) = chunks.last_mut() {
                last[4..6].copy_from_slice(&wire::REPLY_FLAG_DONE.to_be_bytes());
            }
            let parts: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            return self.send(&parts);
        }
        // A long read: one piece read and sent at a time, each its own chunk; the last is done.
        let pieces: Vec<(u64, u64, bool)> = extents
            .into_iter()
            .flat_map(|(offset, len, hole)| {
                let step = if hole { len } else { READ_PIECE };
                (0..len.div_ceil(step)).map(move |i| (offset + i * step, step.min(len - i * step), hole))
            })
            .collect();
        let last = pieces.len() - 1;
        for (i, (offset, len, hole)) in pieces.into_iter().enumerate() {
            let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
            if hole {
                self.send(&[&to.hole(flags, offset, len as u32)]);
            } else {
                match self.data_chunk(&to, flags, offset, len) {
                    Ok(c) => self.send(&[&c]),
                    // Chunks already sent stand; the error chunk ends the reply.
                    Err(f) => return self.reply_error(r, f),
                }
            }
            if self.broken.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk with `len` bytes read from `offset`.
    fn data_chunk(&self, to: &ReplyTo, flags: u16, offset: u64, len: u64) -> Result<Buffer, Fail> {
        let head = to.data_head_len();
        // Left over from an earlier request: `read_at` fills the data part, the head is put.
        let mut buf = self.pool.buffer(head + len as usize);
        self.dev.read_at(offset, &mut buf[head..])?;
        to.put_data_head(&mut buf, flags, offset, len);
        Ok(buf)
    }

    /// Sends `head` followed by `len` bytes read from `offset`, as one message: a simple reply,
    /// or a structured reply that may not be fragmented. Longer than [`READ_PIECE`], it is read
    /// and sent a piece at a time while holding the stream (such a message cannot be
    /// interleaved). A failure to read the first piece is returned before anything is sent; a
    /// later one can only end the connection, as the protocol says.
    fn send_read(&self, head: &[u8], offset: u64, len: u64) -> Result<(), Fail> {
        // Header and first piece in one buffer: one write for the common short read.
        let first = len.min(READ_PIECE);
        // Left over from an earlier request: the head is copied in and `read_at` fills the rest.
        let mut buf = self.pool.buffer(head.len() + first as usize);
        buf[..head.len()].copy_from_slice(head);
        self.dev.read_at(offset, &mut buf[head.len()..])?;
        if first == len {
            self.send(&[&buf]);
            return Ok(());
        }
        self.send_with(None, |w| {
            w.write_all(&buf)?;
            let piece = &mut buf[head.len()..];
            let mut done = first;
            while done < len {
                let n = (len - done).min(READ_PIECE) as usize;
                self.dev
                    .read_at(offset + done, &mut piece[..n])
                    .map_err(|e| io::Error::other(format!("a read failed after its reply had begun: {e}")))?;
                w.write_all(&piece[..n])?;
                done += n as u64;
            }
            Ok(())
        });
        Ok(())
    }

    /// The request's range as (offset, length, is_hole) runs, if the device reports a sane
    /// allocation map with not too many runs.
    fn read_extents(&self, r: &Request) -> Option<Vec<(u64, u64, bool)>> {
        let extents = self.dev.extents(r.offset, r.len).ok()?;
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
        (pos == r.offset + r.len).then_some(out)
    }

    fn block_status(&self, r: &Request) {
        match self.block_status_extents(r) {
            Ok((context, extents)) => self.send(&[&self.reply_to(r).block_status(context, &extents)]),
            Err(f) => self.reply_error(r, f),
        }
    }

    fn block_status_extents(&self, r: &Request) -> Result<(u32, Vec<(u64, u32)>), Fail> {
        self.check_flags(r, wire::CMD_FLAG_FUA | wire::CMD_FLAG_REQ_ONE)?;
        let Some(context) = self.allocation_context.filter(|_| self.structured) else {
            return Err(Fail::new(wire::EINVAL, "no metadata context was negotiated"));
        };
        if r.len == 0 {
            return Err(Fail::new(wire::EINVAL, "block status of an empty range"));
        }
        self.check_range(r, wire::EINVAL)?;
        let max_query = if self.extended { BLOCK_STATUS_MAX_QUERY_EXTENDED } else { BLOCK_STATUS_MAX_QUERY };
        let query = r.len.min(max_query);
        let end = r.offset + query;
        let extents = match self.dev.extents(r.offset, query) {
            Ok(e) => e,
            // "Allocated, contents unknown" is always a correct answer.
            Err(DevError::Unsupported(_)) => return Ok((context, vec![(query, 0)])),
            Err(e) => return Err(e.into()),
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
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
            let len = e_end - pos;
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
            out.push((query, 0));
        }
        if r.flags & wire::CMD_FLAG_REQ_ONE != 0 {
            out.truncate(1);
        }
        Ok((context, out))
    }

    fn reply_status(&self, r: &Request, res: Result<(), Fail>) {
        match res {
            // Extended headers allow no simple replies.
            Ok(()) if self.extended => self.send(&[&self.reply_to(r).done()]),
            Ok(()) => self.send(&[&wire::simple_reply(0, r.handle)]),
            Err(f) => self.reply_error(r, f),
        }
    }

    fn reply_error(&self, r: &Request, f: Fail) {
        debug!(handle = r.handle, typ = r.typ, errno = f.errno, message = %f.message, "request failed");
        if self.structured {
            self.send(&[&self.reply_to(r).error(f.errno, &f.message)]);
        } else {
            self.send(&[&wire::simple_reply(f.errno, r.handle)]);
        }
    }

    /// Sends one reply (all its parts back to back); on failure marks the connection broken.
    fn send(&self, parts: &[&[u8]]) {
        let len = parts.iter().map(|p| p.len()).sum();
        self.send_with(Some(len), |w| parts.iter().try_for_each(|p| w.write_all(p)));
    }

    /// Writes one reply with `write` while holding the stream, then flushes; on failure marks
    /// the connection broken and shuts it down.
    ///
    /// On the reader, in a [`ReplyBatch`], a reply of known length `len` that keeps the batch
    /// within [`BATCH_BYTES`] is left in the writer's buffer instead: the reader has more of
    /// the client's requests at hand, and their replies go out with this one in one `send` —
    /// one system call and one wake-up of the client for the batch, where each reply cost
    /// both. The batch is sent with the first reply that is not batched (a worker's, a longer
    /// one), before the reader blocks for anything ([`SendsBeforeBlocking`], and the waits for
    /// room in the budgets and the pool), and when the reader ends.
    fn send_with(&self, len: Option<usize>, write: impl FnOnce(&mut W) -> io::Result<()>) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writer.lock();
        let unsent = self.unsent.load(Ordering::Acquire);
        let batched = REPLIES_WAIT.get() && len.is_some_and(|n| unsent + n <= BATCH_BYTES);
        let res = write(&mut w).and_then(|()| if batched { Ok(()) } else { w.flush() });
        self.unsent.store(if batched { unsent + len.unwrap_or(0) } else { 0 }, Ordering::Release);
        drop(w);
        if let Err(e) = res {
            self.send_failed(e);
        }
    }

    /// Sends the replies of the reader's batch still in the writer's buffer, if any.
    fn send_unsent(&self) {
        if self.unsent.load(Ordering::Acquire) == 0 || self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writer.lock();
        let res = if self.unsent.swap(0, Ordering::AcqRel) > 0 { w.flush() } else { Ok(()) };
        drop(w);
        if let Err(e) = res {
            self.send_failed(e);
        }
    }

    /// A reply could not be sent: the connection is broken and shut down.
    fn send_failed(&self, e: io::Error) {
        warn!(error = %e, "could not send a reply; closing the connection");
        if !self.broken.swap(true, Ordering::AcqRel) {
            *self.write_error.lock() = Some(e);
        }
        (self.shut)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64) -> Job {
        let req = Request { flags: 0, typ: wire::CMD_FLUSH, handle: seq, offset: 0, len: 0 };
        Job { req, payload: Buffer::empty(), held: None, seq, cost: 0, read_slot: false, skipped: None }
    }

    /// The hook runs before a wait — from the waiting thread, with the budget's lock free (it
    /// may take it) — and never when there is room.
    #[test]
    fn a_budget_runs_its_hook_only_before_it_waits() {
        let budget = Budget { max_count: 1, max_bytes: u64::MAX, used: Mutex::new((0, 0)), freed: Condvar::new() };
        let mut ran = false;
        budget.acquire_or(0, || ran = true);
        assert!(!ran, "room: no hook");
        let (hooked, hook_ran) = std::sync::mpsc::channel();
        thread::scope(|s| {
            let waiter = s.spawn(|| {
                budget.acquire_or(0, || {
                    let held = budget.used.lock().0;
                    hooked.send(held).expect("send");
                })
            });
            let held = hook_ran.recv_timeout(std::time::Duration::from_secs(5));
            let waited_on = !waiter.is_finished();
            // Room again before any assertion, so a failing one ends the test instead of
            // leaving the waiter (and the scope) waiting for ever.
            budget.release(0);
            waiter.join().expect("waiter");
            assert_eq!(held, Ok(1), "the hook ran, while the place was taken");
            assert!(waited_on, "and the acquire waited on after it");
        });
        assert_eq!(budget.used.lock().0, 1);
    }

    #[test]
    fn workers_take_every_queued_job_in_order_then_end_when_the_reader_is_done() {
        let queue = JobQueue::default();
        let taken = thread::scope(|s| {
            let worker = s.spawn(|| std::iter::from_fn(|| queue.pop()).map(|j| j.seq).collect::<Vec<_>>());
            let _closer = CloseOnDrop(&queue);
            for seq in 0..100 {
                queue.push(job(seq));
            }
            // The closer goes here, with jobs possibly still queued: they are still taken.
            drop(_closer);
            worker.join().expect("worker")
        });
        assert_eq!(taken, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_reader_that_panics_still_releases_the_waiting_workers() {
        let queue = JobQueue::default();
        let ended = thread::scope(|s| {
            let worker = s.spawn(|| queue.pop().is_none());
            let reader = s.spawn(|| {
                let _closer = CloseOnDrop(&queue);
                panic!("the reader fails");
            });
            assert!(reader.join().is_err());
            worker.join().expect("worker")
        });
        assert!(ended, "the worker woke to a closed, empty queue");
    }
}
