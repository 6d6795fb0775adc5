//! The threads that execute requests taken off the queues, so the requests a driver keeps in
//! flight on one queue run side by side instead of one after another.
//!
//! A queue thread takes the available descriptor chains, hands each to a worker as a [`Job`]
//! and adds the [`Completion`]s to the used ring as they come back. Jobs carry their own guest
//! memory map, so a memory-table update never pulls a map from under a running request.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use blockdev::BlockDevice;
use crossbeam_channel::{Receiver, Sender};
use vm_memory::GuestMemoryMmap;

use crate::guest_io::DataPath;

use crate::request::{self, Buffers};

/// One request for a worker. Dropped without [`Job::complete`] (a worker that died, a channel
/// that closed), it still completes, with nothing used, so the queue thread never waits for it
/// forever.
pub(crate) struct Job {
    /// The chain's head descriptor (what the used ring is told).
    head: u16,
    /// The chain's buffers.
    buffers: Buffers,
    /// The guest memory the buffers are in.
    mem: Arc<GuestMemoryMmap>,
    /// How the data may move to and from it.
    path: DataPath,
    /// Where the completion goes (the queue thread that took the chain); taken when sent.
    done: Option<Sender<Completion>>,
}

impl Job {
    /// The request of the chain with head `head`, whose completion is sent to `done`.
    pub fn new(
        head: u16,
        buffers: Buffers,
        (mem, path): (Arc<GuestMemoryMmap>, DataPath),
        done: Sender<Completion>,
    ) -> Job {
        Job { head, buffers, mem, path, done: Some(done) }
    }

    /// Reports the request executed with `used` bytes written into its writable buffers.
    fn complete(mut self, used: u32) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Completion { head: self.head, used });
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Completion { head: self.head, used: 0 });
        }
    }
}

/// A request that has been executed and its status byte written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// The chain's head descriptor.
    pub head: u16,
    /// Bytes written into the chain's writable buffers.
    pub used: u32,
}

/// A fixed set of threads executing [`Job`]s on one device; they end when this is dropped.
pub(crate) struct Workers {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` (at least one) threads executing requests on `dev`; `serial` is the
    /// GET_ID answer.
    pub fn spawn(count: usize, dev: Arc<dyn BlockDevice>, serial: Arc<[u8]>) -> io::Result<Workers> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Workers { jobs: Some(jobs), threads: Vec::new() };
        for i in 0..count.max(1) {
            let (queue, dev, serial) = (queue.clone(), dev.clone(), serial.clone());
            let thread =
                thread::Builder::new().name(format!("vhost-blk-io-{i}")).spawn(move || work(&queue, &*dev, &serial))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Queues `job` for the next free worker. Its completion is always sent (a request whose
    /// device call panics completes with an I/O error status).
    pub fn submit(&self, job: Job) {
        // The channel lives and the workers hold its receiving end until `drop`, so the send
        // cannot fail while `self` is alive; if it did, the job is dropped and so completes
        // unexecuted.
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(queue: &Receiver<Job>, dev: &dyn BlockDevice, serial: &[u8]) {
    for job in queue {
        let used = request::execute(dev, &job.mem, job.path, &job.buffers, serial);
        job.complete(used);
    }
}
