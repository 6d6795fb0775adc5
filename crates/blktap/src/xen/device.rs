//! The backend state machine of one blkif device (one directory
//! `/local/domain/<backend>/backend/vbd/<frontend>/<devid>`), advanced one step per poll.
//!
//! ```text
//!  discovered ──open disk, publish features──▶ InitWait ──frontend 3/4: map ring──▶ Connected
//!      │ open fails                               │ frontend 5/6/gone                │ frontend 5/6/1/gone,
//!      ▼                                          ▼                                  ▼ ring ends
//!   Failed (state 5, hotplug-error) ──frontend 5/6──▶ Closed (state 6, disk dropped) ◀── Stopping
//!                                                     ▲ frontend 6/1/gone               │ frontend was 5
//!                                                     └──── Closing (state 5) ◀─────────┘
//!                                                     │ frontend back to 1 (reconnect)
//!                                                     └──────────▶ InitWait
//! ```
//!
//! A backend that stops (the daemon exits or restarts) answers every request it took, writes
//! where the ring stands to [`DETACHED_KEY`] and leaves both states at Connected, so the guest
//! only waits. The next backend finds the frontend and the backend Connected and resumes the
//! ring there ([`crate::ring::BackRing::resume`]) instead of starting a handshake the guest would never join.
//!
//! Everything read from the frontend's directory is untrusted: bad values fail this device
//! only (`error` key, state 5 Closing, like Linux's `xenbus_dev_fatal`).

use std::sync::Arc;

use blockdev::BlockDevice;

use super::backend::{BackendEvent, DiskOpener, XenBackendOptions};
use super::connect::{Connection, Connector, RingSpec};
use super::keys::{BackendConfig, MAX_QUEUES, QueueRing, RingRequest, XenbusState, read_state};
use super::readonly::{NoDiscardDisk, ReadOnlyDisk};
use super::ring_thread::{RingThread, Rings};
use super::store::XenStore;
use super::wakeup::Wakeup;
use crate::engine::MAX_INDIRECT_SEGMENTS;
use crate::server::ServerOptions;
use crate::sim::{MAX_RING_PAGE_ORDER, VDISK_READONLY};
use crate::{Error, Result};

/// The backend-directory key a stopping backend leaves behind once it answered every request
/// it took and flushed the disk: one `INDEX REFS PORT` per queue, separated by `; ` — the
/// ring's published response index, its grant references (comma-separated) and the
/// frontend's event-channel port. A later backend resumes only those rings, only there.
pub const DETACHED_KEY: &str = "parallax-detached-at";

/// Where and which rings a backend detached from ([`DETACHED_KEY`]), in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Detached {
    queues: Vec<DetachedRing>,
}

/// One queue's ring in a [`Detached`] record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DetachedRing {
    index: u32,
    ring: String,
}

impl Detached {
    /// A ring's identity: its grants and event-channel port.
    fn ring_of(queue: &QueueRing) -> String {
        let refs: Vec<String> = queue.ring_refs.iter().map(u32::to_string).collect();
        format!("{} {}", refs.join(","), queue.event_channel)
    }

    fn parse(value: &str) -> Option<Self> {
        let queues = value
            .split(';')
            .map(|q| {
                let (index, ring) = q.trim().split_once(' ')?;
                Some(DetachedRing { index: super::keys::number(index)?, ring: ring.trim().to_string() })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { queues })
    }

    fn value(&self) -> String {
        let queues: Vec<String> = self.queues.iter().map(|q| format!("{} {}", q.index, q.ring)).collect();
        queues.join("; ")
    }

    fn rings(&self) -> Vec<String> {
        self.queues.iter().map(|q| q.ring.clone()).collect()
    }
}

/// Where a device is in the handshake.
enum Phase {
    /// Features published, state InitWait: waiting for the frontend's ring.
    Waiting { disk: Arc<dyn BlockDevice> },
    /// The rings (one per queue) are served.
    Connected { rings: Rings },
    /// The rings were asked to stop; then `then`.
    Stopping { rings: Rings, then: AfterStop, reason: String },
    /// State Closing because the frontend is closing (mirrored, as blkback does); the disk is
    /// released. Closed once the frontend is Closed.
    Closing,
    /// State Closed, no disk held. Reopened if the frontend starts over.
    Closed,
    /// Failed and reported (state Closing); waits for the frontend to close.
    Failed,
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Waiting { .. } => "Waiting",
            Self::Connected { .. } => "Connected",
            Self::Stopping { .. } => "Stopping",
            Self::Closing => "Closing",
            Self::Closed => "Closed",
            Self::Failed => "Failed",
        })
    }
}

/// What a stopping ring's device does once the ring has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    /// State Closed, disk released (the frontend is gone or Closed).
    Close,
    /// State Closing, mirroring the frontend, until it is Closed.
    MirrorClosing,
    /// State Closing after an error (published in `error`).
    Fail,
}

/// One device of the backend.
#[derive(Debug)]
pub struct Device {
    dir: String,
    frontend_id: u32,
    devid: u32,
    /// The queues offered (`multi-queue-max-queues`).
    max_queues: u32,
    config: Option<BackendConfig>,
    phase: Phase,
    /// Set when the device was found already connected by an earlier backend: the ring is to be
    /// resumed where that backend detached ([`DETACHED_KEY`]; `None` if it left no record).
    resume: Option<Option<Detached>>,
    /// The identity of each connected queue's ring (see [`Detached`]).
    ring_ids: Vec<String>,
    /// The frontend's state was garbled and that was reported; until it reads well again, it
    /// counts as a frontend gone.
    garbled_front_reported: bool,
}

type Observer<'a> = &'a mut dyn FnMut(&BackendEvent);

/// How a connection was made.
enum Started {
    /// A new handshake.
    Fresh { pages: usize, queues: usize, protocol: crate::abi::Abi, sectors: u64, read_only: bool },
    /// An earlier backend's rings, resumed at these indices, with requests already waiting.
    Resumed { indices: Vec<u32>, waiting: u32 },
}

/// What a backend shutdown did with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// The rings were left for a later backend at these indices; the guest waits.
    Detached {
        /// Each queue's published response index, in queue order.
        indices: Vec<u32>,
    },
    /// The device was closed (state Closed, or Closing with an `error`).
    Closed,
    /// Left as found: it was still waiting to resume an earlier backend's ring.
    Untouched,
}

impl Device {
    /// A device found at `dir`: opens its disk and publishes its features, or reports why not.
    pub fn discover(
        store: &impl XenStore,
        dir: String,
        frontend_id: u32,
        devid: u32,
        opener: &dyn DiskOpener,
        opts: &XenBackendOptions,
        observe: Observer<'_>,
    ) -> Self {
        let mut dev = Self {
            dir,
            frontend_id,
            devid,
            max_queues: opts.max_queues.clamp(1, MAX_QUEUES),
            config: None,
            phase: Phase::Closed,
            resume: None,
            ring_ids: Vec::new(),
            garbled_front_reported: false,
        };
        dev.open(store, opener, true, observe);
        dev
    }

    /// The backend directory of the device.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The frontend's `state` node, once the toolstack's keys were read: the backend watches
    /// it (as Linux's `xenbus_watch_otherend` does; the ring keys are written before it).
    pub fn frontend_state(&self) -> Option<String> {
        self.config.as_ref().map(|c| format!("{}/state", c.frontend))
    }

    fn write(&self, store: &impl XenStore, key: &str, value: &str) -> Result<()> {
        store.write(&format!("{}/{key}", self.dir), value)
    }

    /// Writes keys of the device's directory in one transaction, unless the toolstack
    /// already removed the directory (the writes would bring a device nobody cleans up back).
    fn write_keys(&self, store: &impl XenStore, keys: &[(&str, &str)]) -> Result<()> {
        let paths: Vec<String> = keys.iter().map(|(k, _)| format!("{}/{k}", self.dir)).collect();
        let writes: Vec<(&str, &str)> = paths.iter().map(String::as_str).zip(keys.iter().map(|(_, v)| *v)).collect();
        match store.write_all_in(&self.dir, &writes)? {
            true => Ok(()),
            false => Err(Error::Refused(format!("{} was removed by the toolstack", self.dir))),
        }
    }

    /// Writes our state, unless the toolstack already removed the directory (a write would
    /// bring it back): the same guarded transaction as every other write of ours.
    fn set_state(&self, store: &impl XenStore, state: XenbusState) -> Result<()> {
        self.write_keys(store, &[("state", state.value())])
    }

    fn open(&mut self, store: &impl XenStore, opener: &dyn DiskOpener, first: bool, observe: Observer<'_>) {
        match self.try_open(store, opener, first) {
            Ok((disk, target)) => {
                self.phase = Phase::Waiting { disk };
                observe(&BackendEvent::Opened { device: self.dir.clone(), target });
            }
            Err(e) => {
                let msg = bounded_message(e.to_string());
                let _ = self.write_keys(store, &[("hotplug-error", &msg)]);
                let _ = self.set_state(store, XenbusState::Closing);
                self.phase = Phase::Failed;
                observe(&BackendEvent::Failed { device: self.dir.clone(), error: msg });
            }
        }
    }

    fn try_open(
        &mut self,
        store: &impl XenStore,
        opener: &dyn DiskOpener,
        first: bool,
    ) -> Result<(Arc<dyn BlockDevice>, String)> {
        let config = BackendConfig::read(store, &self.dir, self.frontend_id)?;
        // Known from now on, even if opening fails: the frontend is watched, so the failed
        // device still closes when the frontend does.
        self.config = Some(config.clone());
        let front = if first { read_state(store, &config.frontend)? } else { None };
        let ours = if first { read_state(store, &self.dir)? } else { None };
        // Backend Connected when we start: an earlier backend served this ring, and the frontend
        // (Initialised, or Connected once it saw us) still uses it. Resume it (checked against
        // the ring when connecting).
        let resume = if ours == Some(XenbusState::Connected)
            && matches!(front, Some(XenbusState::Initialised | XenbusState::Connected))
        {
            let record = store.read(&format!("{}/{DETACHED_KEY}", self.dir))?;
            Some(record.as_deref().and_then(Detached::parse))
        } else if front == Some(XenbusState::Connected) {
            return Err(Error::Refused(
                "frontend already connected to an earlier backend that never got to Connected; reconnect it".into(),
            ));
        } else {
            None
        };
        let disk =
            opener.open(&config.target).map_err(|e| Error::Refused(format!("cannot open {}: {e}", config.target)))?;
        let disk: Arc<dyn BlockDevice> =
            if config.read_only && !disk.read_only() { Arc::new(ReadOnlyDisk(disk)) } else { disk };
        let disk: Arc<dyn BlockDevice> = if config.discard { disk } else { Arc::new(NoDiscardDisk(disk)) };
        let target = config.target.clone();
        let fresh = resume.is_none();
        if fresh {
            self.publish_features(store, &config)?;
        }
        self.config = Some(config);
        self.resume = resume;
        Ok((disk, target))
    }

    fn publish_features(&self, store: &impl XenStore, config: &BackendConfig) -> Result<()> {
        let _ = store.rm(&format!("{}/hotplug-error", self.dir));
        let _ = store.rm(&format!("{}/error", self.dir));
        let _ = store.rm(&format!("{}/{DETACHED_KEY}", self.dir));
        // The features and the InitWait that announces them, in one transaction.
        let indirect = MAX_INDIRECT_SEGMENTS.to_string();
        let order = MAX_RING_PAGE_ORDER.to_string();
        let queues = self.max_queues.to_string();
        let mut keys = vec![("feature-flush-cache", "1"), ("feature-barrier", "1")];
        if config.discard {
            keys.extend([("feature-discard", "1"), ("discard-granularity", "4096"), ("discard-alignment", "0")]);
        } else {
            keys.push(("feature-discard", "0"));
        }
        keys.extend([
            ("feature-max-indirect-segments", indirect.as_str()),
            ("max-ring-page-order", order.as_str()),
            ("multi-queue-max-queues", queues.as_str()),
            ("state", XenbusState::InitWait.value()),
        ]);
        self.write_keys(store, &keys)
    }

    /// Advances the device by one step after looking at the frontend.
    pub fn step<C: Connector>(
        &mut self,
        store: &impl XenStore,
        connector: &C,
        opener: &dyn DiskOpener,
        opts: &XenBackendOptions,
        ended: &Wakeup,
        observe: Observer<'_>,
    ) {
        let Some(frontend) = self.config.as_ref().map(|c| c.frontend.clone()) else {
            return; // Failed before the toolstack's keys could be read: nothing to watch.
        };
        let front = match read_state(store, &frontend) {
            Ok(s) => {
                self.garbled_front_reported = false;
                s
            }
            // Reported once; after that a garbled state counts as a frontend gone (each report
            // writes under our watched root, so failing again would wake us forever).
            Err(Error::Protocol(_)) if self.garbled_front_reported => None,
            Err(e @ Error::Protocol(_)) => {
                self.garbled_front_reported = true;
                return self.fail(store, e, observe);
            }
            Err(_) => return, // xenstore trouble: try again at the next event
        };
        let closing = matches!(front, None | Some(XenbusState::Closing | XenbusState::Closed));
        match std::mem::replace(&mut self.phase, Phase::Failed) {
            Phase::Waiting { disk } => {
                self.phase = Phase::Waiting { disk: disk.clone() };
                if front == Some(XenbusState::Closing) {
                    self.mirror_closing(store);
                } else if closing {
                    self.close(store, "frontend closed before connecting", observe);
                } else if matches!(front, Some(XenbusState::Initialised | XenbusState::Connected)) {
                    self.connect(store, connector, disk, opts, ended, observe);
                }
            }
            Phase::Connected { rings } => {
                if rings.any_finished() {
                    // A ring ended on its own (the frontend went away, or it failed): the
                    // device goes down with all its queues.
                    rings.stop();
                    let reason = "frontend went away".to_string();
                    self.phase = Phase::Stopping { rings, then: AfterStop::Close, reason };
                    self.settle_stopping(store, observe);
                } else if closing || front == Some(XenbusState::Initialising) {
                    // Requests already taken are answered first. A frontend that is Closing
                    // is mirrored and disconnected only at its Closed (Linux's blkfront and
                    // kexec's reset wait for our Closing); otherwise the device closes.
                    rings.stop();
                    let reason = format!("frontend state {}", front.map_or("gone", XenbusState::value));
                    let then =
                        if front == Some(XenbusState::Closing) { AfterStop::MirrorClosing } else { AfterStop::Close };
                    self.phase = Phase::Stopping { rings, then, reason };
                } else {
                    self.phase = Phase::Connected { rings };
                }
            }
            phase @ Phase::Stopping { .. } => {
                self.phase = phase;
                self.settle_stopping(store, observe);
            }
            Phase::Closing => {
                self.phase = Phase::Closing;
                if matches!(front, None | Some(XenbusState::Closed | XenbusState::Initialising)) {
                    self.close(store, "frontend closed", observe);
                }
            }
            Phase::Closed => {
                self.phase = Phase::Closed;
                let online = store.read(&format!("{}/online", self.dir)).ok().flatten();
                if front == Some(XenbusState::Initialising) && online.as_deref().map(str::trim_ascii) != Some("0") {
                    self.open(store, opener, false, observe);
                }
            }
            Phase::Failed => {
                self.phase = Phase::Failed;
                if closing {
                    self.close(store, "frontend closed after a failure", observe);
                }
            }
        }
    }

    /// Once every ring of a stopping device has ended: joins them and moves on as planned
    /// (or fails the device, if a ring failed).
    fn settle_stopping(&mut self, store: &impl XenStore, observe: Observer<'_>) {
        let Phase::Stopping { rings, .. } = &self.phase else { return };
        if !rings.all_finished() {
            return;
        }
        let Phase::Stopping { rings, then, reason } = std::mem::replace(&mut self.phase, Phase::Closed) else {
            unreachable!("checked above")
        };
        match (then, rings.join()) {
            (_, Err(e)) => self.fail(store, e, observe),
            (AfterStop::Close, Ok(_)) => self.close(store, &reason, observe),
            (AfterStop::MirrorClosing, Ok(_)) => self.mirror_closing(store),
            (AfterStop::Fail, Ok(_)) => {
                self.phase = Phase::Failed;
                let _ = self.set_state(store, XenbusState::Closing);
            }
        }
    }

    fn connect<C: Connector>(
        &mut self,
        store: &impl XenStore,
        connector: &C,
        disk: Arc<dyn BlockDevice>,
        opts: &XenBackendOptions,
        ended: &Wakeup,
        observe: Observer<'_>,
    ) {
        let Some(frontend) = self.config.as_ref().map(|c| c.frontend.clone()) else { return };
        let resume = self.resume.take();
        // Threads already started when a later queue's thread could not be: stopped by `fail`.
        let mut spawned = Vec::new();
        let started = (|| {
            // A ring being resumed was negotiated against an earlier backend's offer, which a
            // restart with fewer CPUs or another `max_queues` must not take back: the record
            // decides whether the rings are the same.
            let limit = if resume.is_some() { MAX_QUEUES } else { self.max_queues };
            let req = RingRequest::read(store, &frontend, limit)?;
            // Every queue is mapped (and checked) before any is served.
            let mut conns = Vec::with_capacity(req.queues.len());
            for queue in &req.queues {
                let spec = RingSpec {
                    frontend_id: self.frontend_id,
                    ring_refs: queue.ring_refs.clone(),
                    event_channel: queue.event_channel,
                    protocol: req.protocol,
                };
                conns.push(connector.connect(&spec)?);
            }
            let ring_ids: Vec<String> = req.queues.iter().map(Detached::ring_of).collect();
            let resumed = match resume {
                None => None,
                Some(detached) => {
                    // Only after a clean detach, from these very rings (a frontend reloaded
                    // meanwhile has new ones): see `BackRing::resume`.
                    let detached = detached.ok_or_else(|| {
                        Error::Refused(
                            "the previous backend stopped without detaching (it may have died with writes \
                             not yet durable or requests unanswered): the ring cannot be resumed safely"
                                .into(),
                        )
                    })?;
                    if detached.rings() != ring_ids {
                        return Err(Error::Refused(format!(
                            "the previous backend detached from ring {}, the frontend now has ring {}",
                            detached.rings().join("; "),
                            ring_ids.join("; ")
                        )));
                    }
                    let mut waiting = 0;
                    conns = conns
                        .into_iter()
                        .zip(&detached.queues)
                        .map(|(conn, queue)| {
                            let ring = conn.ring.resumed(queue.index)?;
                            // Guest-written, read again: only for the log, never trusted.
                            waiting = ring.waiting()?.min(ring.size()).saturating_add(waiting);
                            Ok(Connection { ring, ..conn })
                        })
                        .collect::<Result<_>>()?;
                    let indices = detached.queues.iter().map(|q| q.index).collect();
                    Some(Started::Resumed { indices, waiting })
                }
            };
            self.ring_ids = ring_ids;
            let (sectors, read_only) = (disk.size() / 512, disk.read_only());
            let queues = conns.len();
            // The queues share the device's workers (`--ring-workers`), so a guest asking for
            // more queues gets more rings, not more threads than one disk is allowed.
            let server = ServerOptions { workers: opts.server.workers.div_ceil(queues).max(1) };
            for (q, conn) in conns.into_iter().enumerate() {
                let name = if queues == 1 {
                    format!("blkif-{}-{}", self.frontend_id, self.devid)
                } else {
                    // Short enough for the 15 bytes Linux keeps of a thread's name.
                    format!("blkif{}-{}q{q}", self.frontend_id, self.devid)
                };
                spawned.push(RingThread::spawn(name, conn, disk.clone(), server.clone(), ended)?);
            }
            Ok::<_, Error>(resumed.unwrap_or(Started::Fresh {
                pages: req.queues[0].ring_refs.len(),
                queues,
                protocol: req.protocol,
                sectors,
                read_only,
            }))
        })();
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                if !spawned.is_empty() {
                    self.phase = Phase::Connected { rings: Rings::new(spawned) };
                }
                return self.fail(store, e, observe);
            }
        };
        self.phase = Phase::Connected { rings: Rings::new(spawned) };
        match started {
            Started::Resumed { indices, waiting } => {
                let _ = store.rm(&format!("{}/{DETACHED_KEY}", self.dir));
                observe(&BackendEvent::Resumed { device: self.dir.clone(), indices, waiting });
            }
            Started::Fresh { pages, queues, protocol, sectors, read_only } => {
                // The disk's facts and the state that tells blkfront to read them, at once.
                let sectors = sectors.to_string();
                let info = if read_only { VDISK_READONLY } else { 0 }.to_string();
                let keys = [
                    ("sectors", sectors.as_str()),
                    ("sector-size", "512"),
                    ("physical-sector-size", "4096"),
                    ("info", info.as_str()),
                    ("state", XenbusState::Connected.value()),
                ];
                match self.write_keys(store, &keys) {
                    Ok(()) => observe(&BackendEvent::Connected {
                        device: self.dir.clone(),
                        ring_pages: pages,
                        queues,
                        protocol,
                    }),
                    Err(e) => self.fail(store, e, observe),
                }
            }
        }
    }

    /// Reports `error`, stops the ring if there is one, and moves to Closing.
    fn fail(&mut self, store: &impl XenStore, error: Error, observe: Observer<'_>) {
        let msg = bounded_message(error.to_string());
        let _ = self.write_keys(store, &[("error", &msg)]);
        observe(&BackendEvent::Failed { device: self.dir.clone(), error: msg.clone() });
        match std::mem::replace(&mut self.phase, Phase::Failed) {
            Phase::Connected { rings } | Phase::Stopping { rings, .. } => {
                rings.stop();
                self.phase = Phase::Stopping { rings, then: AfterStop::Fail, reason: msg };
            }
            _ => {
                let _ = self.set_state(store, XenbusState::Closing);
            }
        }
    }

    /// Drops the disk and moves to Closing, as the frontend did; Closed follows at its Closed.
    fn mirror_closing(&mut self, store: &impl XenStore) {
        self.phase = Phase::Closing;
        let _ = self.set_state(store, XenbusState::Closing);
    }

    /// Drops the disk and moves to Closed (the ring, if any, has already ended).
    fn close(&mut self, store: &impl XenStore, reason: &str, observe: Observer<'_>) {
        self.phase = Phase::Closed;
        let _ = self.set_state(store, XenbusState::Closed);
        observe(&BackendEvent::Closed { device: self.dir.clone(), reason: reason.to_string() });
    }

    /// Takes the ring threads out of the device (when its directory vanished), asking them to
    /// stop; the disk is dropped with the device.
    pub fn take_rings(&mut self) -> Option<Rings> {
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Connected { rings } | Phase::Stopping { rings, .. } => {
                rings.stop();
                Some(rings)
            }
            _ => None,
        }
    }

    /// Asks the device's rings to stop, without waiting: a backend shutting down asks every
    /// device first, so the devices drain at once rather than one after the other.
    pub fn request_stop(&self) {
        if let Phase::Connected { rings } | Phase::Stopping { rings, .. } = &self.phase {
            rings.stop();
        }
    }

    /// Stops the device for a backend shutdown. A connected ring is detached: every request
    /// taken is answered, the ring's index goes to [`DETACHED_KEY`] and the states stay
    /// Connected, so a later backend resumes it and the guest only waits. Anything else
    /// (a ring that could not drain, a device mid-handshake) is closed.
    pub fn shutdown(mut self, store: &impl XenStore) -> Shutdown {
        if self.resume.is_some() {
            // Still waiting to resume an earlier backend's ring: leave it (and its record) for
            // the next backend.
            return Shutdown::Untouched;
        }
        let connected = matches!(self.phase, Phase::Connected { .. });
        let finished = self.take_rings().map(Rings::join);
        match &finished {
            Some(Ok(rings)) if connected && store.read(&self.dir).ok().flatten().is_some() => {
                // Resumable only if every queue's ring stopped quiescent.
                let at: Option<Vec<u32>> = rings.iter().map(|f| f.quiescent_at).collect();
                if let Some(indices) = at.filter(|at| at.len() == self.ring_ids.len()) {
                    let queues = indices
                        .iter()
                        .zip(&self.ring_ids)
                        .map(|(&index, ring)| DetachedRing { index, ring: ring.clone() })
                        .collect();
                    let record = Detached { queues };
                    if self.write(store, DETACHED_KEY, &record.value()).is_ok() {
                        return Shutdown::Detached { indices };
                    }
                }
            }
            Some(Err(e)) => {
                // The ring ended in an error nobody reported yet (a failed flush): say so.
                let _ = self.write(store, "error", &e.to_string());
                let _ = self.set_state(store, XenbusState::Closing);
                return Shutdown::Closed;
            }
            _ => {}
        }
        if self.config.is_some() {
            let _ = self.set_state(store, XenbusState::Closed);
        }
        Shutdown::Closed
    }
}

/// The longest `error` / `hotplug-error` value written: messages may quote guest-written
/// values, and xenstore's payload is 4 KiB with the path.
const MAX_MESSAGE: usize = 512;

/// `msg`, cut to [`MAX_MESSAGE`] bytes at a character boundary.
fn bounded_message(mut msg: String) -> String {
    if msg.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str("...");
    }
    msg
}
