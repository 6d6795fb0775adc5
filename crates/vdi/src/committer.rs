//! Commits in the background once the journal is half full, so a guest's write never waits
//! for a commit it did not ask for.
//!
//! Without it, the write whose transaction crossed half the journal ran the commit itself —
//! writing and syncing every dirty metadata block — and that one guest request took as long
//! as the commit (tens of milliseconds, over a hundred with 10 ms snapshots and no flushes).
//! Now such a write asks the committer and returns; only a write that finds the journal three
//! quarters full ([`blockstore::Meta::must_commit`]) commits itself, which is the back-pressure
//! that keeps every transaction fitting one record while a commit is slow. A FLUSH or FUA
//! write still waits for its commit: that is what it asks for.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::registry::Registry;

/// Wakes the background committer, and tells it to stop.
#[derive(Default)]
pub(crate) struct CommitSignal {
    state: Mutex<SignalState>,
    wake: Condvar,
}

#[derive(Default)]
struct SignalState {
    /// A commit was asked for since the committer last started one.
    requested: bool,
    stop: bool,
    /// A committer thread is serving requests.
    running: bool,
}

impl CommitSignal {
    /// Asks the background committer for a commit soon. False if no committer is running: the
    /// caller commits itself.
    pub(crate) fn request(&self) -> bool {
        let mut s = self.state.lock();
        if !s.running {
            return false;
        }
        if !s.requested {
            s.requested = true;
            self.wake.notify_one();
        }
        true
    }

    /// Waits for a request; false once a stop is asked for.
    fn wait(&self) -> bool {
        let mut s = self.state.lock();
        while !s.requested && !s.stop {
            self.wake.wait(&mut s);
        }
        s.requested = false;
        !s.stop
    }

    fn stop(&self) {
        let mut s = self.state.lock();
        s.stop = true;
        s.running = false;
        drop(s);
        self.wake.notify_all();
    }
}

impl Registry {
    /// Starts a thread that commits when a write finds the journal half full, instead of that
    /// write committing while its guest waits (see the module `committer`). It stops when the
    /// handle is dropped; writes then commit themselves again.
    pub fn start_committer(self: &Arc<Self>) -> Committer {
        let signal = self.committer.clone();
        {
            let mut s = signal.state.lock();
            s.running = true;
            s.stop = false;
            s.requested = false;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("commit".into()).spawn({
            let signal = signal.clone();
            move || committer_loop(&weak, &signal)
        });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // Writes commit themselves, as without a committer.
                tracing::warn!("cannot start the background committer: {e}");
                signal.stop();
                None
            }
        };
        Committer { signal, thread }
    }
}

fn committer_loop(reg: &Weak<Registry>, signal: &CommitSignal) {
    while signal.wait() {
        let Some(registry) = reg.upgrade() else { break };
        // Race tests hold the committer here to show that writes go on without it.
        test_point!("vdi::committer::before_commit");
        if let Err(e) = registry.store.commit() {
            // A failed commit poisons the store: every later write fails and says why.
            tracing::error!("background commit failed: {e}");
        }
    }
    signal.stop();
}

/// The background committer of a registry ([`Registry::start_committer`]); dropping it stops
/// the thread after the commit it may be making.
pub struct Committer {
    signal: Arc<CommitSignal>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.signal.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
