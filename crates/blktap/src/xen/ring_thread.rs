//! One served ring on its own thread (plus the server's worker pool), with its own stop signal,
//! so a slow disk stalls only its own ring.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use blockdev::BlockDevice;
use shutdown::Shutdown;

use super::connect::Connection;
use super::wakeup::Wakeup;
use crate::engine::Engine;
use crate::event::EventChannel;
use crate::grant::GrantTable;
use crate::server::{Ended, RingServer, ServerOptions};
use crate::{Error, Result};

/// A ring being served by a [`RingServer`] on a thread of its own.
#[derive(Debug)]
pub struct RingThread {
    stop: Shutdown,
    handle: JoinHandle<Result<Finished>>,
    /// Set (then `ended` signalled) as the thread's work ends, even by a panic.
    done: Arc<AtomicBool>,
}

/// Marks the ring's thread done and wakes the backend when dropped: at the end of the thread's
/// work, or while it unwinds.
struct DoneGuard {
    done: Arc<AtomicBool>,
    ended: Wakeup,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        self.ended.signal();
    }
}

/// How a served ring ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Why the server returned.
    pub ended: Ended,
    /// The published response index if the ring was stopped with every request taken
    /// answered and the disk then flushed: where a later backend may resume the ring.
    pub quiescent_at: Option<u32>,
}

impl RingThread {
    /// Starts serving `conn` against `disk` on a new thread called `name`; `ended` is signalled
    /// when the ring stops being served, for whatever reason.
    pub fn spawn<G, E>(
        name: String,
        conn: Connection<G, E>,
        disk: Arc<dyn BlockDevice>,
        options: ServerOptions,
        ended: &Wakeup,
    ) -> Result<Self>
    where
        G: GrantTable + Send + Sync + 'static,
        E: EventChannel + 'static,
    {
        let stop = Shutdown::new()?;
        let flag = stop.clone();
        let done = Arc::new(AtomicBool::new(false));
        let guard = DoneGuard { done: done.clone(), ended: ended.clone() };
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let _guard = guard;
            let Connection { ring, grants, events } = conn;
            let durable = disk.clone();
            let server = RingServer::new(ring, Engine::new(disk, grants), events, options);
            let ended = server.run(&flag)?;
            // A later backend may resume the ring only if everything the guest was told is
            // done is also durable: a guest that was never told of a restart would never
            // replay its journal over writes a crash had lost.
            let quiescent_at = match (ended, server.quiescent_at()) {
                (Ended::Stopped, Some(at)) if durable.flush().is_ok() => Some(at),
                _ => None,
            };
            Ok(Finished { ended, quiescent_at })
        })?;
        Ok(Self { stop, handle, done })
    }

    /// Asks the server to stop (it answers the requests it already took first).
    pub fn stop(&self) {
        self.stop.trigger();
    }

    /// True once the server has returned (`join` then returns at once).
    pub fn is_finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for the server to return, and says how it ended. Dropping the server releases
    /// the ring mapping, the event channel and the server's reference to the disk.
    pub fn join(self) -> Result<Finished> {
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Protocol("the ring server thread panicked".into())),
        }
    }
}

/// The rings of one device, one per queue (`multi-queue-num-queues`), each on its own thread:
/// stopped together, and done only when all are.
#[derive(Debug)]
pub struct Rings(Vec<RingThread>);

impl Rings {
    /// The rings of a device's queues, in queue order.
    pub fn new(rings: Vec<RingThread>) -> Self {
        assert!(!rings.is_empty(), "a connected device has at least one ring");
        Self(rings)
    }

    /// Asks every ring to stop (each answers the requests it already took first).
    pub fn stop(&self) {
        self.0.iter().for_each(RingThread::stop);
    }

    /// True once any ring's server returned: the device is going down.
    pub fn any_finished(&self) -> bool {
        self.0.iter().any(RingThread::is_finished)
    }

    /// True once every ring's server returned (`join` then returns at once).
    pub fn all_finished(&self) -> bool {
        self.0.iter().all(RingThread::is_finished)
    }

    /// Waits for every ring and says how each ended, in queue order; the first error if any
    /// ring failed (every ring is joined all the same).
    pub fn join(self) -> Result<Vec<Finished>> {
        let mut finished = Vec::with_capacity(self.0.len());
        let mut first_error = None;
        for ring in self.0 {
            match ring.join() {
                Ok(f) => finished.push(f),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(finished), Err)
    }
}
