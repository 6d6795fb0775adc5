//! Commits in the background once a quarter of the journal is used, so a guest's write rarely
//! waits for a commit it did not ask for.
//!
//! Without it, the write whose transaction filled half the journal ran the commit itself —
//! writing and syncing every dirty metadata block — and that one guest request took as long
//! as the commit (tens of milliseconds with 10 ms snapshots and no flushes). Now writes ask
//! the committer from a quarter on ([`blockstore::Meta::commit_soon`]) and go on; a write
//! still commits itself at half ([`blockstore::Meta::should_commit`]), as before, when the
//! committer falls behind — the back-pressure that keeps the other half of the journal for
//! transactions already under way. A FLUSH or FUA write still waits for its commit: that is
//! what it asks for.

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
    /// Asks the background committer, if one runs, for a commit soon.
    pub(crate) fn request(&self) {
        let mut s = self.state.lock();
        if s.running && !s.requested {
            s.requested = true;
            self.wake.notify_one();
        }
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
    /// Starts a thread that commits when a write finds a quarter of the journal used, before
    /// writes reach half and commit themselves while their guests wait (see the module
    /// `committer`). It stops when the handle is dropped. Start one per registry.
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
