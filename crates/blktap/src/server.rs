//! Serving one ring with many requests in flight.
//!
//! A [`RingServer`] owns a dispatcher (the thread that calls [`RingServer::run`]) and a small
//! pool of worker threads of its own, so a slow VDI stalls only its own ring. The dispatcher
//! copies requests out of the ring and hands them to the workers; each worker executes a request
//! against the device, writes its response into the next response slot and notifies the
//! frontend when the ring's hold-off logic asks for it. Responses are produced in completion
//! order, which blkif allows (the `id` pairs them with requests).
//!
//! A `WRITE_BARRIER` is an ordering point: the dispatcher waits until every earlier request has
//! been answered, executes the barrier itself, and only then takes later requests.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockdev::BlockDevice;
use crossbeam_channel::bounded;
use parking_lot::{Condvar, Mutex};
use shutdown::Shutdown;

use crate::Result;
use crate::abi::{OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_ERROR, RSP_OKAY};
use crate::engine::{Engine, Verdict};
use crate::event::{EventChannel, Wake};
use crate::grant::GrantTable;
use crate::request::{BlkRequest, Body};
use crate::ring::BackRing;

/// How a ring is served.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Worker threads executing requests of this ring concurrently (at least 1).
    pub workers: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { workers: 4 }
    }
}

/// Counters of a served ring.
#[derive(Debug, Default)]
pub struct RingStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with a status other than `BLKIF_RSP_OKAY`.
    pub failed: AtomicU64,
    /// Notifications sent to the frontend.
    pub notifications: AtomicU64,
}

/// Why a ring stopped being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The stop flag was raised; every request taken was answered.
    Stopped,
    /// The frontend closed its event channel; every request taken was answered.
    PeerGone,
}

/// Serves a ring until it is stopped, the frontend goes away, or the ring breaks.
pub struct RingServer<D, G, E> {
    ring: Mutex<BackRing>,
    engine: Engine<D, G>,
    events: E,
    in_flight: Mutex<u32>,
    drained: Condvar,
    stats: Arc<RingStats>,
    options: ServerOptions,
}

/// Counts a request as finished when dropped, even if its execution unwound.
struct InFlightGuard<'a, D: BlockDevice, G: GrantTable + Send + Sync, E: EventChannel>(&'a RingServer<D, G, E>);

impl<D: BlockDevice, G: GrantTable + Send + Sync, E: EventChannel> Drop for InFlightGuard<'_, D, G, E> {
    fn drop(&mut self) {
        self.0.finished_one();
    }
}

impl<D, G, E> RingServer<D, G, E>
where
    D: BlockDevice,
    G: GrantTable + Send + Sync,
    E: EventChannel,
{
    /// A server for `ring`, executing requests with `engine` and talking over `events`.
    pub fn new(ring: BackRing, engine: Engine<D, G>, events: E, options: ServerOptions) -> Self {
        Self {
            ring: Mutex::new(ring),
            engine,
            events,
            in_flight: Mutex::new(0),
            drained: Condvar::new(),
            stats: Arc::new(RingStats::default()),
            options,
        }
    }

    /// After [`RingServer::run`] returned: the ring's published response index if every
    /// request taken was answered (see [`BackRing::quiescent_at`]).
    pub fn quiescent_at(&self) -> Option<u32> {
        self.ring.lock().quiescent_at()
    }

    /// The counters, readable while the ring is served.
    pub fn stats(&self) -> Arc<RingStats> {
        self.stats.clone()
    }

    /// Serves the ring on the calling thread (plus the worker pool) until `stop` is raised or
    /// the frontend goes away. Requests already taken off the ring are always answered before
    /// this returns. Errors if the frontend broke the ring protocol.
    pub fn run(&self, stop: &Shutdown) -> Result<Ended> {
        let workers = self.options.workers.max(1);
        let capacity = self.ring.lock().size() as usize;
        let (tx, rx) = bounded::<BlkRequest>(capacity);
        std::thread::scope(|s| {
            for _ in 0..workers {
                let rx = rx.clone();
                s.spawn(move || {
                    for req in rx {
                        let _done = InFlightGuard(self);
                        let status = self.execute(&req);
                        self.respond(&req, status);
                    }
                });
            }
            drop(rx);
            let ended = self.dispatch(stop, |req| {
                *self.in_flight.lock() += 1;
                // The workers only stop when `tx` is dropped, so sending cannot fail.
                let _ = tx.send(req);
            });
            drop(tx);
            ended
        })
    }

    fn dispatch(&self, stop: &Shutdown, mut submit: impl FnMut(BlkRequest)) -> Result<Ended> {
        loop {
            if stop.is_raised() {
                return Ok(Ended::Stopped);
            }
            let next = self.ring.lock().next_request();
            match next {
                Ok(Some(req)) if is_flush(&req) => {
                    // On this thread, so that a failed flush can end the ring at once: it is
                    // not answered (see `Engine::execute`), the device is failed.
                    if req.operation == OP_WRITE_BARRIER {
                        self.wait_drained();
                    }
                    match self.verdict(&req) {
                        Verdict::Respond(status) => self.respond(&req, status),
                        Verdict::FailDevice(why) => {
                            tracing::error!(id = req.id, error = %why, "a flush failed: failing the device");
                            return Err(crate::Error::FlushFailed(why));
                        }
                    }
                }
                Ok(Some(req)) if req.operation == OP_WRITE_BARRIER => {
                    self.wait_drained();
                    let status = self.execute(&req);
                    self.respond(&req, status);
                }
                Ok(Some(req)) if self.is_lone(&req)? => {
                    // Nothing else in flight or waiting: a hop to a worker would only add
                    // latency (the queue-depth-1 case).
                    let status = self.execute(&req);
                    self.respond(&req, status);
                }
                Ok(Some(req)) => submit(req),
                Ok(None) => {
                    if self.ring.lock().final_check_for_requests()? {
                        continue;
                    }
                    // Sleep until the frontend notifies us or the stop signal is raised:
                    // no timeout, so an idle ring costs nothing.
                    match stop.wait_readable(self.events.readable_fd(), None)? {
                        shutdown::Ready::Stopped => return Ok(Ended::Stopped),
                        shutdown::Ready::Readable | shutdown::Ready::TimedOut => {}
                    }
                    match self.events.take()? {
                        Wake::Notified | Wake::TimedOut => {}
                        Wake::Closed => return Ok(Ended::PeerGone),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// True if `req` is a read or write with nothing in flight and nothing else on the ring.
    fn is_lone(&self, req: &BlkRequest) -> Result<bool> {
        if !matches!(req.response_operation(), OP_READ | OP_WRITE) || *self.in_flight.lock() > 0 {
            return Ok(false);
        }
        Ok(self.ring.lock().unconsumed_requests()? == 0)
    }

    /// [`Engine::execute`] for an empty flush, with a panic (a bug) answered as an error.
    fn verdict(&self, req: &BlkRequest) -> Verdict {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.engine.execute(req))) {
            Ok(v) => v,
            Err(_) => {
                tracing::error!(id = req.id, operation = req.operation, "request panicked; answered with an error");
                Verdict::Respond(RSP_ERROR)
            }
        }
    }

    /// Executes a request; a panic in the device (a bug, never guest input) becomes an error
    /// response instead of a ring that waits for ever.
    fn execute(&self, req: &BlkRequest) -> i16 {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.engine.handle(req))) {
            Ok(status) => status,
            Err(_) => {
                tracing::error!(id = req.id, operation = req.operation, "request panicked; answered with an error");
                RSP_ERROR
            }
        }
    }

    fn respond(&self, req: &BlkRequest, status: i16) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if status != RSP_OKAY {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        let notify = {
            let mut ring = self.ring.lock();
            // Every response answers a request taken off this ring, so there is always a slot;
            // a failure here means shared memory vanished, and the frontend learns by timeout.
            ring.put_response(req.id, req.response_operation(), status)
                .and_then(|()| ring.push_responses_and_check_notify())
        };
        if let Ok(true) = notify {
            self.stats.notifications.fetch_add(1, Ordering::Relaxed);
            // A frontend that went away is noticed by the dispatcher's wait.
            let _ = self.events.notify();
        }
    }

    fn finished_one(&self) {
        let mut n = self.in_flight.lock();
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    fn wait_drained(&self) {
        let mut n = self.in_flight.lock();
        while *n > 0 {
            self.drained.wait(&mut n);
        }
    }
}

/// A flush or barrier (with or without data).
fn is_flush(req: &BlkRequest) -> bool {
    matches!(req.operation, OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER) && matches!(req.body, Body::Segments { .. })
}
