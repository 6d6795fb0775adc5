//! Pause points for deterministic race tests, over the `fail` crate's callbacks.
//!
//! The engine crates mark the instants a race could hit with `fail::fail_point!("name")`
//! (compiled out unless their `failpoints` feature is on). [`Pause::arm`] makes the first
//! thread that reaches such a point stop there; the test waits until it has
//! ([`Pause::wait_reached`]), does what the other side of the race does, then lets it go
//! ([`Pause::resume`]). No sleeps: both sides wait on channels.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

/// Serializes tests that use fail points (their configuration is process-wide).
pub type Scenario = fail::FailScenario<'static>;

/// Starts a fail-point scenario: holds a process-wide lock until dropped and clears every fail
/// point on both ends.
pub fn scenario() -> Scenario {
    fail::FailScenario::setup()
}

/// One armed pause point (see the module documentation). Dropping it disarms the point and
/// lets a paused thread go.
pub struct Pause {
    name: String,
    reached: Receiver<()>,
    resume: Option<Sender<()>>,
}

impl Pause {
    /// Arms the fail point `name`: the first thread to reach it stops there.
    pub fn arm(name: &str) -> Pause {
        let (reached_tx, reached) = bounded(1);
        let (resume, resume_rx) = bounded::<()>(0);
        let armed = AtomicBool::new(true);
        fail::cfg_callback(name, move || {
            if armed.swap(false, Ordering::AcqRel) {
                let _ = reached_tx.send(());
                // Returns when resumed, or when the Pause is dropped (the sender goes away).
                let _ = resume_rx.recv();
            }
        })
        .expect("fail point configured");
        Pause { name: name.to_string(), reached, resume: Some(resume) }
    }

    /// Waits until a thread has stopped at the point. Fails (after two minutes: a thread
    /// that never comes) rather than hang if none does — say, the point was renamed.
    pub fn wait_reached(&self) {
        if self.reached.recv_timeout(std::time::Duration::from_secs(120)).is_err() {
            panic!("no thread reached the pause point {:?}", self.name);
        }
    }

    /// Lets the stopped thread go on, and disarms the point.
    pub fn resume(mut self) {
        if let Some(tx) = self.resume.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.resume.take();
        fail::remove(&self.name);
    }
}

/// The thread a [`MediumGate`] stops, with the channels that report and end the stop.
type Armed = (std::thread::ThreadId, Sender<()>, Receiver<()>);

/// A store medium that can stop one thread inside its next metadata-sized read (to show that
/// the thread holds no lock others need while it reads the medium) or inside its next sync (to
/// hold a commit between its start and its commit point).
pub struct MediumGate {
    inner: blockstore::MemBackend,
    armed: parking_lot::Mutex<Option<Armed>>,
    armed_sync: parking_lot::Mutex<Option<Armed>>,
}

/// The test's side of an armed [`MediumGate`].
pub struct GateHandle {
    reached: Receiver<()>,
    resume: Sender<()>,
}

impl MediumGate {
    /// A gate over `inner`.
    pub fn new(inner: blockstore::MemBackend) -> MediumGate {
        MediumGate { inner, armed: parking_lot::Mutex::new(None), armed_sync: parking_lot::Mutex::new(None) }
    }

    /// Stops the next 4 KiB read made by `thread` until the handle resumes it.
    pub fn arm(&self, thread: std::thread::ThreadId) -> GateHandle {
        let (reached_tx, reached) = bounded(1);
        let (resume, resume_rx) = bounded(0);
        *self.armed.lock() = Some((thread, reached_tx, resume_rx));
        GateHandle { reached, resume }
    }

    /// Stops the next sync made by `thread` until the handle resumes it.
    pub fn arm_sync(&self, thread: std::thread::ThreadId) -> GateHandle {
        let (reached_tx, reached) = bounded(1);
        let (resume, resume_rx) = bounded(0);
        *self.armed_sync.lock() = Some((thread, reached_tx, resume_rx));
        GateHandle { reached, resume }
    }
}

impl GateHandle {
    /// Waits until the thread is stopped inside its read or sync (fails after two minutes).
    pub fn wait_reached(&self) {
        if self.reached.recv_timeout(std::time::Duration::from_secs(120)).is_err() {
            panic!("the gated thread never read or synced the medium");
        }
    }

    /// Lets the read or sync finish.
    pub fn resume(self) {
        let _ = self.resume.send(());
    }
}

/// Stops the calling thread, if `slot` is armed for it, until the test resumes it (disarming
/// the slot).
fn stop_if_armed(slot: &parking_lot::Mutex<Option<Armed>>) {
    let me = std::thread::current().id();
    let gate = {
        let mut armed = slot.lock();
        match armed.as_ref() {
            Some((t, _, _)) if *t == me => armed.take(),
            _ => None,
        }
    };
    if let Some((_, reached, resume)) = gate {
        let _ = reached.send(());
        let _ = resume.recv();
    }
}

impl blockstore::Backend for MediumGate {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if buf.len() == blockstore::BLOCK_SIZE {
            stop_if_armed(&self.armed);
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn sync(&self) -> std::io::Result<()> {
        stop_if_armed(&self.armed_sync);
        self.inner.sync()
    }
    fn extend(&self, len: u64) -> std::io::Result<()> {
        self.inner.extend(len)
    }
    fn reserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
}
