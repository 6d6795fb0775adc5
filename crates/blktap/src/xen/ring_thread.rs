//! One served ring on its own thread (plus the server's worker pool), with its own stop signal,
//! so a slow disk stalls only its own ring.

use std::sync::Arc;
use std::thread::JoinHandle;

use blockdev::BlockDevice;
use shutdown::Shutdown;

use super::connect::Connection;
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
    /// Starts serving `conn` against `disk` on a new thread called `name`.
    pub fn spawn<G, E>(
        name: String,
        conn: Connection<G, E>,
        disk: Arc<dyn BlockDevice>,
        options: ServerOptions,
    ) -> Result<Self>
    where
        G: GrantTable + Send + Sync + 'static,
        E: EventChannel + 'static,
    {
        let stop = Shutdown::new()?;
        let flag = stop.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
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
        Ok(Self { stop, handle })
    }

    /// Asks the server to stop (it answers the requests it already took first).
    pub fn stop(&self) {
        self.stop.trigger();
    }

    /// True once the server has returned.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
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
