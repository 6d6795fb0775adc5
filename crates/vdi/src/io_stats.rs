//! I/O counters: per VDI (kept while the registry is open, whoever does the I/O) and per open
//! handle (one NBD connection, one ring guest), for `vdi stats` and parallaxd's metrics.
//!
//! Each operation costs two clock reads and a few relaxed atomic adds; nothing is locked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::registry::{Registry, Source};

/// Upper bounds of the latency histogram's buckets, in microseconds (powers of 4 from 16 µs
/// to about 4 s); a last bucket takes everything slower.
pub const LATENCY_BOUNDS_US: [u64; 10] = [16, 64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The kinds of operation counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// A read.
    Read,
    /// A write (FUA or not).
    Write,
    /// A flush.
    Flush,
    /// A discard or write-zeroes.
    Discard,
}

/// Counters of one VDI or handle, updated lock-free.
#[derive(Default)]
pub(crate) struct IoCounters {
    ops: [AtomicU64; 4],
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    latency_sum_ns: AtomicU64,
}

impl IoCounters {
    pub(crate) fn record(&self, op: IoOp, bytes: u64, took: Duration, ok: bool) {
        let r = Ordering::Relaxed;
        self.ops[op as usize].fetch_add(1, r);
        match op {
            IoOp::Read => self.read_bytes.fetch_add(bytes, r),
            IoOp::Write => self.write_bytes.fetch_add(bytes, r),
            _ => 0,
        };
        if !ok {
            self.errors.fetch_add(1, r);
        }
        let us = took.as_micros() as u64;
        let bucket = LATENCY_BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, r);
        self.latency_sum_ns.fetch_add(took.as_nanos() as u64, r);
    }

    pub(crate) fn snapshot(&self) -> IoSnapshot {
        let r = Ordering::Relaxed;
        let op = |o: IoOp| self.ops[o as usize].load(r);
        IoSnapshot {
            reads: op(IoOp::Read),
            writes: op(IoOp::Write),
            flushes: op(IoOp::Flush),
            discards: op(IoOp::Discard),
            read_bytes: self.read_bytes.load(r),
            write_bytes: self.write_bytes.load(r),
            errors: self.errors.load(r),
            latency_buckets: self.latency.iter().map(|b| b.load(r)).collect(),
            latency_sum_ns: self.latency_sum_ns.load(r),
        }
    }
}

/// Counters as of one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoSnapshot {
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Discards and write-zeroes.
    pub discards: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Operations per latency bucket (see [`LATENCY_BOUNDS_US`]; one more for slower ones).
    pub latency_buckets: Vec<u64>,
    /// Total time of all operations, nanoseconds.
    pub latency_sum_ns: u64,
}

impl IoSnapshot {
    /// All operations.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards
    }

    /// The bucket bound (µs) at or below which fraction `q` of the operations completed, or
    /// `None` with no operations (or in the last, unbounded bucket).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return LATENCY_BOUNDS_US.get(i).copied();
            }
        }
        None
    }
}

/// One open handle's identity and counters.
pub(crate) struct HandleStats {
    pub(crate) source: Source,
    /// The VDI the source belongs to (the snapshot's VDI, for a snapshot).
    pub(crate) vdi: crate::VdiId,
    pub(crate) writable: bool,
    pub(crate) client: Mutex<String>,
    pub(crate) opened: SystemTime,
    pub(crate) since: Instant,
    pub(crate) counters: IoCounters,
}

impl HandleStats {
    pub(crate) fn set_client(&self, client: &str) {
        *self.client.lock() = client.to_string();
    }

    /// Runs one operation `f`, counting it for this handle and in `also` (its VDI's counters).
    pub(crate) fn meter<T, E>(
        &self,
        also: Option<&IoCounters>,
        op: IoOp,
        bytes: usize,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let t = Instant::now();
        let r = f();
        self.record(also, op, bytes, t.elapsed(), r.is_ok());
        r
    }

    /// [`HandleStats::meter`] for an attempt that may decline (`Ok(None)`: it would have
    /// waited): counted only when it did the operation. A failed attempt is not counted
    /// either: its caller does the operation again the usual way, which counts it.
    pub(crate) fn meter_attempt<T, E>(
        &self,
        also: Option<&IoCounters>,
        op: IoOp,
        bytes: usize,
        f: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        let t = Instant::now();
        let r = f();
        if let Ok(Some(_)) = r {
            self.record(also, op, bytes, t.elapsed(), true);
        }
        r
    }

    /// Counts one operation for this handle and in `also`.
    fn record(&self, also: Option<&IoCounters>, op: IoOp, bytes: usize, took: Duration, ok: bool) {
        for c in std::iter::once(&self.counters).chain(also) {
            c.record(op, bytes as u64, took, ok);
        }
    }
}

/// What one handle did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandleReport {
    /// The VDI or snapshot it has open.
    pub source: String,
    /// The VDI that is, or whose snapshot that is.
    pub vdi: crate::VdiId,
    /// Opened for writing.
    pub writable: bool,
    /// Who has it open, as the transport describes the client (e.g. `tcp:127.0.0.1:50312`).
    pub client: String,
    /// When it was opened, seconds since the Unix epoch.
    pub opened_unix: u64,
    /// Seconds it has been open.
    pub open_seconds: f64,
    /// Its counters.
    pub io: IoSnapshot,
}

/// What one VDI did since the registry was opened (all its handles, past and present).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VdiIoReport {
    /// The VDI.
    pub vdi: crate::VdiId,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Handles open now.
    pub open_handles: usize,
    /// Its counters.
    pub io: IoSnapshot,
}

/// The client a handle names until its transport says who it serves (`set_client`): how a
/// handle opened by a `vdi` command, not by a guest, looks.
pub const UNNAMED_CLIENT: &str = "local";

/// Open handles, for counting per handle.
#[derive(Default)]
pub(crate) struct Handles(Mutex<Vec<Weak<HandleStats>>>);

impl Handles {
    pub(crate) fn register(&self, source: Source, vdi: crate::VdiId, writable: bool) -> Arc<HandleStats> {
        let h = Arc::new(HandleStats {
            source,
            vdi,
            writable,
            client: Mutex::new(UNNAMED_CLIENT.to_string()),
            opened: SystemTime::now(),
            since: Instant::now(),
            counters: IoCounters::default(),
        });
        let mut list = self.0.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&h));
        h
    }
}

pub(crate) fn describe_source(src: Source) -> String {
    match src {
        Source::Vdi(id) => format!("VDI {id}"),
        Source::Snapshot(s) => format!("snapshot {s}"),
    }
}

pub(crate) fn handle_report(h: &HandleStats) -> HandleReport {
    HandleReport {
        source: describe_source(h.source),
        vdi: h.vdi,
        writable: h.writable,
        client: h.client.lock().clone(),
        opened_unix: h.opened.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        open_seconds: h.since.elapsed().as_secs_f64(),
        io: h.counters.snapshot(),
    }
}

impl Registry {
    /// Counters of every VDI since the registry was opened.
    pub fn vdi_io(&self) -> Vec<VdiIoReport> {
        let st = self.state.lock();
        st.vdis
            .iter()
            .map(|(id, v)| VdiIoReport {
                vdi: *id,
                name: v.name.clone(),
                size: v.live.size.load(Ordering::Acquire),
                open_handles: v.live.open.load(Ordering::Acquire),
                io: v.live.stats.snapshot(),
            })
            .collect()
    }

    /// Counters of every handle open now (NBD connections, ring guests, commands reading).
    pub fn handle_io(&self) -> Vec<HandleReport> {
        let list: Vec<Arc<HandleStats>> = self.handles.0.lock().iter().filter_map(Weak::upgrade).collect();
        list.iter().map(|h| handle_report(h)).collect()
    }
}
