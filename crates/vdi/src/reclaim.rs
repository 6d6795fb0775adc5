//! Freeing deleted VDIs, snapshots and discarded ranges in bounded steps.
//!
//! Deletes only queue their trees (see `radix::defer_release`); the work of freeing them is
//! done here, one short transaction at a time, so no single operation — however large — holds
//! the metadata for long or outgrows the journal, and the other VMs' I/O goes on between steps.
//! The queue is persistent: a crash or restart in the middle resumes where the last commit was.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use blockstore::BlockStore;
use parking_lot::{Condvar, Mutex};

use crate::Result;
use crate::registry::Registry;

/// Metadata blocks one reclaim transaction may change: small, so the metadata lock is held
/// briefly; on a store with a tiny journal, a quarter of what a record holds.
const STEP_BLOCKS: usize = 48;

/// The background reclaimer commits once this many metadata blocks wait: small commits, so a
/// guest's FLUSH never waits behind a large reclaim record.
const COMMIT_BLOCKS: usize = 512;

/// ... and at the latest this long after its first step not yet committed. Not as soon as the
/// queue is empty: a schedule's retention queues a snapshot every 10 ms, and a commit per
/// deletion would be a hundred commits a second of the same count blocks, which the guests'
/// own flushes commit anyway. Freed blocks become usable at the commit, so this is also how
/// long freed space may wait.
const COMMIT_WITHIN: std::time::Duration = std::time::Duration::from_millis(250);

/// How long the reclaimer waits after a failed step before trying again (unless woken).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Wakes the background reclaimer when something is queued, and tells it to stop.
#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    wake: Condvar,
}

/// Why the reclaimer woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    /// Something was queued (or a retry is due).
    Work,
    /// A stop was requested.
    Stop,
    /// Steps it made are due to be committed ([`COMMIT_WITHIN`]).
    Due,
}

#[derive(Default)]
struct SignalState {
    work: bool,
    stop: bool,
    running: bool,
}

impl Signal {
    /// Wakes the reclaimer if the release queue holds anything.
    pub(crate) fn wake_if_queued(&self, store: &BlockStore) {
        if radix::queue_len(&*store.lock()) > 0 {
            self.state.lock().work = true;
            self.wake.notify_all();
        }
    }

    /// Waits until there is work, a stop request, or `due` has come.
    fn wait(&self, due: Option<Instant>) -> Woken {
        let mut s = self.state.lock();
        while !s.work && !s.stop {
            match due {
                Some(at) => {
                    if self.wake.wait_until(&mut s, at).timed_out() && !s.work && !s.stop {
                        return Woken::Due;
                    }
                }
                None => self.wake.wait(&mut s),
            }
        }
        s.work = false;
        if s.stop { Woken::Stop } else { Woken::Work }
    }

    /// After a failure: waits for a wake-up, a stop request or [`RETRY_AFTER`].
    fn wait_to_retry(&self) -> Woken {
        let mut s = self.state.lock();
        if !s.work && !s.stop {
            self.wake.wait_for(&mut s, RETRY_AFTER);
        }
        s.work = false;
        if s.stop { Woken::Stop } else { Woken::Work }
    }

    fn exited(&self) {
        self.state.lock().running = false;
    }

    fn stop(&self) {
        let mut s = self.state.lock();
        s.stop = true;
        s.running = false;
        drop(s);
        self.wake.notify_all();
    }

    fn stopping(&self) -> bool {
        self.state.lock().stop
    }
}

/// What reclaiming did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimStats {
    /// Blocks freed.
    pub freed: u64,
    /// Entries still in the release queue.
    pub remaining: u64,
}

impl Registry {
    /// True while a background reclaimer ([`Registry::start_reclaimer`]) runs.
    pub fn has_reclaimer(&self) -> bool {
        self.reclaim.state.lock().running
    }

    /// Entries in the release queue: deleted trees and blocks not yet freed (`vdi info`).
    pub fn pending_reclaim(&self) -> u64 {
        radix::queue_len(&*self.store.lock())
    }

    /// Frees one bounded step's worth of the release queue, in one transaction. The step is
    /// durable at the next commit; `reclaim_all` and the background reclaimer commit as they go.
    pub fn reclaim_step(&self) -> Result<ReclaimStats> {
        let budget = STEP_BLOCKS.min(self.store.lock().journal_capacity() / 4).max(4);
        // Nodes not in memory are read without the metadata lock (the step is retried).
        let r = self.store.with_transaction(|txn| radix::reclaim_step(txn, budget))?;
        Ok(ReclaimStats { freed: r.freed, remaining: r.remaining })
    }

    /// Empties the release queue, committing whenever half the journal is used and at the end.
    /// `progress(freed, remaining)` is called after every step.
    pub fn reclaim_all(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ReclaimStats> {
        let mut total = ReclaimStats { freed: 0, remaining: self.pending_reclaim() };
        while total.remaining > 0 {
            let step = self.reclaim_step()?;
            total.freed += step.freed;
            total.remaining = step.remaining;
            progress(total.freed, total.remaining);
            if self.store.lock().should_commit() {
                self.store.commit()?;
            }
        }
        self.store.commit()?;
        Ok(total)
    }

    /// Starts a thread that empties the release queue whenever something is queued, in
    /// bounded steps between which other I/O proceeds. It stops when the handle is dropped.
    pub fn start_reclaimer(self: &Arc<Self>) -> Reclaimer {
        let signal = self.reclaim.clone();
        {
            let mut s = signal.state.lock();
            s.running = true;
            s.stop = false;
        }
        let weak = Arc::downgrade(self);
        let thread =
            std::thread::Builder::new().name("reclaim".into()).spawn(move || reclaimer_loop(&weak, &signal)).ok();
        // Anything queued before this start (a restart in the middle of a delete) is resumed.
        self.reclaim.wake_if_queued(&self.store);
        Reclaimer { signal: self.reclaim.clone(), thread }
    }
}

fn reclaimer_loop(reg: &Weak<Registry>, signal: &Signal) {
    // When the oldest step not yet committed by the reclaimer was made.
    let mut uncommitted: Option<Instant> = None;
    let mut woken = signal.wait(None);
    loop {
        let Some(registry) = reg.upgrade() else { break };
        if woken != Woken::Work {
            // Due, or stopping: what was freed becomes usable (and durable) now.
            if uncommitted.take().is_some()
                && let Err(e) = registry.store.commit()
            {
                tracing::warn!("committing what reclaim freed: {e}");
            }
            if woken == Woken::Stop {
                break;
            }
            drop(registry);
            woken = signal.wait(None);
            continue;
        }
        let outcome = reclaim_until_empty(&registry, signal, &mut uncommitted);
        drop(registry);
        woken = match outcome {
            Ok(()) => signal.wait(uncommitted.map(|t| t + COMMIT_WITHIN)),
            Err(e) => {
                // A full store, a busy journal, damage: keep the queue, try again later.
                tracing::warn!("reclaim paused: {e}; retrying");
                signal.wait_to_retry()
            }
        };
    }
    signal.exited();
}

/// True if what reclaim frees should be committed at once: the store cannot grow and less
/// than a quarter of its blocks are free to allocate now. Blocks freed but not committed
/// cannot be reused, so deferring the commit there could fail guests' copy-on-write writes
/// for space that is already free (a store that can grow adds a group instead).
fn space_is_tight(reg: &Registry) -> bool {
    let m = reg.store.lock();
    let s = m.space();
    !m.can_grow() && s.capacity.saturating_sub(s.allocated + s.pending_free) < s.capacity / 4
}

/// Reclaims until the queue is empty or a stop is requested, committing as [`COMMIT_BLOCKS`]
/// and [`COMMIT_WITHIN`] say — at the end at once if [`space_is_tight`]; `uncommitted` is when
/// its oldest step not yet committed was made.
fn reclaim_until_empty(reg: &Registry, signal: &Signal, uncommitted: &mut Option<Instant>) -> Result<()> {
    loop {
        if signal.stopping() {
            return Ok(());
        }
        let step = match reg.reclaim_step() {
            Ok(step) => step,
            Err(e) => {
                // Whatever was freed so far becomes usable once committed.
                reg.store.commit()?;
                *uncommitted = None;
                return Err(e);
            }
        };
        let since = *uncommitted.get_or_insert_with(Instant::now);
        let waiting = reg.store.lock().next_record_blocks();
        let due = since.elapsed() >= COMMIT_WITHIN || (step.remaining == 0 && space_is_tight(reg));
        if due || waiting >= COMMIT_BLOCKS || reg.store.lock().should_commit() {
            reg.store.commit()?;
            *uncommitted = None;
        }
        if step.freed > 0 {
            tracing::debug!("reclaim: freed {} blocks, {} entries left", step.freed, step.remaining);
        }
        if step.remaining == 0 {
            return Ok(());
        }
    }
}

/// The background reclaimer of a registry ([`Registry::start_reclaimer`]); dropping it stops
/// the thread (the queue is kept, and the next start resumes it).
pub struct Reclaimer {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use blockdev::BlockDevice;
    use blockstore::format::GROUP_BLOCKS;
    use blockstore::{CreateOptions, MemBackend, OpenOptions};

    use super::*;

    fn store(max_blocks: u64) -> Arc<Registry> {
        let create = CreateOptions { journal_slot_blocks: 64, max_blocks };
        let store = BlockStore::create(Arc::new(MemBackend::new()), &create, &OpenOptions::default()).unwrap();
        Registry::open(Arc::new(store)).unwrap()
    }

    /// Writes 64-block pieces of a new VDI of `blocks` blocks until the store is full or the
    /// VDI written; returns the blocks written.
    fn fill(reg: &Arc<Registry>, blocks: u64) -> u64 {
        let id = reg.create_vdi("vm", Some(blocks * 4096)).unwrap();
        let dev = reg.open_vdi(id, true).unwrap();
        let piece = vec![7; 64 * 4096];
        let mut written = 0;
        while written < blocks && dev.write_at(written * 4096, &piece, false).is_ok() {
            written += 64;
        }
        dev.flush().unwrap();
        written
    }

    #[test]
    fn space_is_tight_only_on_a_store_that_cannot_grow_and_has_little_free() {
        let limit = store(0).store().lock().superblock().end_block() + 2 * GROUP_BLOCKS;
        let capped = store(limit);
        let written = fill(&capped, 8 * GROUP_BLOCKS);
        assert!(written < 8 * GROUP_BLOCKS, "the capped store took {written} blocks");
        assert!(!capped.store().lock().can_grow(), "the capped store reached its limit");
        assert!(space_is_tight(&capped), "{:?}", capped.store().lock().space());
        let unlimited = store(0);
        fill(&unlimited, written);
        assert!(unlimited.store().lock().can_grow());
        assert!(!space_is_tight(&unlimited), "a store that can grow adds a group instead");
    }
}
