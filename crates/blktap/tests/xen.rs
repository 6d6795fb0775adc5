//! The handshake end to end: an in-memory xenstore, simulated grants and event channels, a
//! fake toolstack and a fake frontend that serves I/O through the ring.

#![cfg(feature = "xen")]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use blockdev::{BlockDevice, MemDisk};
use parking_lot::Mutex;
use zerocopy::IntoBytes;

use blkfront_sim::front::FrontRing;
use blktap::abi::{Abi, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, PAGE_SIZE, RSP_OKAY, Request, Segment, X86_32Request};
use blktap::event::{EventChannel, SocketEvents};
use blktap::grant::SimGrantTable;
use blktap::ring::BackRing;
use blktap::server::ServerOptions;
use blktap::shm::SharedMem;
use blktap::xen::*;
use blktap::{Error, Result};

const DISK_BYTES: u64 = 8 << 20;
const DATA_PAGES: u32 = 4;

/// A guest's grantable memory and the event channel ports it allocated.
struct SimDomain {
    file: File,
    pages: u32,
    ports: HashMap<u32, UnixStream>,
}

/// Connects rings against simulated domains: grant `k` is page `k` of the domain's file.
#[derive(Default)]
struct SimConnector {
    domains: Mutex<HashMap<u32, SimDomain>>,
}

impl Connector for SimConnector {
    type Grants = SimGrantTable;
    type Events = SocketEvents;

    fn connect(&self, spec: &RingSpec) -> Result<Connection<SimGrantTable, SocketEvents>> {
        let mut domains = self.domains.lock();
        let dom = domains.get_mut(&spec.frontend_id).ok_or_else(|| Error::Protocol("unknown domain".into()))?;
        let first = spec.ring_refs[0];
        for (i, &r) in spec.ring_refs.iter().enumerate() {
            if r >= dom.pages || r != first + i as u32 {
                return Err(Error::BadGrant(r));
            }
        }
        let n = spec.ring_refs.len();
        let ring = SharedMem::from_file(&dom.file, u64::from(first) * PAGE_SIZE as u64, n * PAGE_SIZE)?;
        let all = SharedMem::from_file(&dom.file, 0, dom.pages as usize * PAGE_SIZE)?;
        let stream = dom.ports.remove(&spec.event_channel).ok_or_else(|| Error::Protocol("port not bound".into()))?;
        Ok(Connection {
            ring: BackRing::new(Arc::new(ring), spec.protocol)?,
            grants: SimGrantTable::new(Arc::new(all))?,
            events: SocketEvents::new(stream),
        })
    }
}

fn back_dir(front: u32, devid: u32) -> String {
    format!("/local/domain/0/backend/vbd/{front}/{devid}")
}

fn front_dir(front: u32, devid: u32) -> String {
    format!("/local/domain/{front}/device/vbd/{devid}")
}

/// What `xl block-attach` writes, in one transaction as libxl does (the backend, woken by the
/// first key, must never see half a device).
fn toolstack_add(store: &MemStore, front: u32, devid: u32, params: &str, mode: &str) {
    let b = back_dir(front, devid);
    let f = front_dir(front, devid);
    let (front_id, devid) = (front.to_string(), devid.to_string());
    let keys = [
        (format!("{b}/frontend"), f.as_str()),
        (format!("{b}/frontend-id"), front_id.as_str()),
        (format!("{b}/params"), params),
        (format!("{b}/mode"), mode),
        (format!("{b}/online"), "1"),
        (format!("{b}/type"), "phy"),
        (format!("{b}/state"), "1"),
        (format!("{f}/backend"), b.as_str()),
        (format!("{f}/backend-id"), "0"),
        (format!("{f}/virtual-device"), devid.as_str()),
        (format!("{f}/state"), "1"),
    ];
    let writes: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    store.write("/local/domain", "").unwrap();
    assert!(store.write_all_in("/local/domain", &writes).unwrap());
}

fn toolstack_remove(store: &MemStore, front: u32, devid: u32) {
    store.rm(&back_dir(front, devid)).unwrap();
    store.rm(&front_dir(front, devid)).unwrap();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_state(store: &MemStore, dir: &str, state: &str) {
    wait_until(&format!("{dir}/state = {state}"), || {
        store.read(&format!("{dir}/state")).unwrap().as_deref() == Some(state)
    });
}

/// A fake blkfront: its memory, ring and event channel.
struct Front {
    mem: Arc<SharedMem>,
    ring: FrontRing,
    events: SocketEvents,
    data_gref: u32,
    abi: Abi,
    /// This queue's event channel port.
    port: u32,
}

impl Front {
    /// Sets up memory and ring, registers them with the connector and publishes the ring keys
    /// the way blkfront does, then switches to Initialised.
    fn connect(store: &MemStore, conn: &SimConnector, front: u32, devid: u32, order: u32, abi: Abi) -> Self {
        Self::connect_queues(store, conn, front, devid, order, abi, 1, None).pop().unwrap()
    }

    /// [`Front::connect`], but a one-page ring publishes `ring_ref` (a grant it may never have
    /// made), written before the state, as blkfront does.
    fn connect_with_ring_ref(
        store: &MemStore,
        conn: &SimConnector,
        front: u32,
        devid: u32,
        order: u32,
        abi: Abi,
        ring_ref: &str,
    ) -> Self {
        let mut queues = Self::connect_queues(store, conn, front, devid, order, abi, 1, Some(ring_ref));
        queues.pop().unwrap()
    }

    /// Sets up `queues` rings the way blkfront does: with one queue, its keys in the device's
    /// directory; with several, `multi-queue-num-queues` and each queue's keys in `queue-N`.
    /// Queue `q`'s ring is at page `q << order`; its data pages follow all the rings. The flat
    /// layout of a one-page ring publishes `ring_ref` if given.
    #[allow(clippy::too_many_arguments)]
    fn connect_queues(
        store: &MemStore,
        conn: &SimConnector,
        front: u32,
        devid: u32,
        order: u32,
        abi: Abi,
        queues: u32,
        ring_ref: Option<&str>,
    ) -> Vec<Self> {
        let ring_pages = 1u32 << order;
        let pages = queues * (ring_pages + DATA_PAGES);
        let file = tempfile::tempfile().unwrap();
        file.set_len(u64::from(pages) * PAGE_SIZE as u64).unwrap();
        let mem = Arc::new(SharedMem::from_file(&file, 0, pages as usize * PAGE_SIZE).unwrap());
        let f = front_dir(front, devid);
        let mut fronts = Vec::new();
        for q in 0..queues {
            let first = q * ring_pages;
            let ring_mem = Arc::new(
                SharedMem::from_file(&file, u64::from(first) * PAGE_SIZE as u64, ring_pages as usize * PAGE_SIZE)
                    .unwrap(),
            );
            let ring = FrontRing::init(ring_mem, abi).unwrap();
            let (ours, theirs) = UnixStream::pair().unwrap();
            let port = 10 + devid + 1000 * q;
            let mut domains = conn.domains.lock();
            let dom = domains.entry(front).or_insert_with(|| SimDomain {
                file: file.try_clone().unwrap(),
                pages,
                ports: HashMap::new(),
            });
            assert_eq!(dom.pages, pages, "one layout per simulated domain");
            dom.ports.insert(port, theirs);
            drop(domains);
            let dir = if queues == 1 { f.clone() } else { format!("{f}/queue-{q}") };
            match (order, ring_ref) {
                (0, Some(r)) => store.write(&format!("{dir}/ring-ref"), r).unwrap(),
                (0, None) => store.write(&format!("{dir}/ring-ref"), &first.to_string()).unwrap(),
                _ => {
                    for i in 0..ring_pages {
                        store.write(&format!("{dir}/ring-ref{i}"), &(first + i).to_string()).unwrap();
                    }
                }
            }
            store.write(&format!("{dir}/event-channel"), &port.to_string()).unwrap();
            let data_gref = queues * ring_pages + q * DATA_PAGES;
            fronts.push(Self { mem: mem.clone(), ring, events: SocketEvents::new(ours), data_gref, abi, port });
        }
        if order > 0 {
            store.write(&format!("{f}/ring-page-order"), &order.to_string()).unwrap();
        }
        if queues > 1 {
            store.write(&format!("{f}/multi-queue-num-queues"), &queues.to_string()).unwrap();
        }
        store.write(&format!("{f}/protocol"), blktap::sim::protocol_name(abi)).unwrap();
        store.write(&format!("{f}/state"), "3").unwrap();
        fronts
    }

    /// One 4 KiB request on data page `page`; returns its status.
    fn io(&mut self, op: u8, id: u64, sector: u64, page: u32) -> i16 {
        self.submit(op, id, sector, page);
        self.response(id)
    }

    /// Puts one 4 KiB request on data page `page` on the ring and notifies the backend.
    fn submit(&mut self, op: u8, id: u64, sector: u64, page: u32) {
        let mut seg = [Segment::default(); 11];
        seg[0] = Segment { gref: self.data_gref + page, first_sect: 0, last_sect: 7, pad: 0 };
        let bytes = match self.abi {
            Abi::X86_64 => {
                Request { operation: op, nr_segments: 1, id, sector_number: sector, seg, ..Default::default() }
                    .as_bytes()
                    .to_vec()
            }
            Abi::X86_32 => X86_32Request { operation: op, nr_segments: 1, handle: 0, id, sector_number: sector, seg }
                .as_bytes()
                .to_vec(),
        };
        self.ring.put_request(&bytes).unwrap();
        // With no backend bound, the notification goes nowhere (as on Xen).
        if self.ring.push_requests_and_check_notify().unwrap() {
            let _ = self.events.notify();
        }
    }

    /// Waits for the response to request `id` (the next one on the ring) and returns its status.
    fn response(&mut self, id: u64) -> i16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((rid, _, status)) = self.ring.take_response().unwrap() {
                assert_eq!(rid, id);
                return status;
            }
            assert!(Instant::now() < deadline, "no response to request {id}");
            let _ = self.events.wait(Duration::from_millis(20));
        }
    }

    /// A new event channel port pair for the next backend to bind (the old backend's end
    /// closed with it, as Xen leaves the frontend's port unbound).
    fn rebind(&mut self, conn: &SimConnector, front: u32) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        conn.domains.lock().get_mut(&front).unwrap().ports.insert(self.port, theirs);
        self.events = SocketEvents::new(ours);
    }

    fn page_offset(&self, page: u32) -> usize {
        (self.data_gref + page) as usize * PAGE_SIZE
    }

    fn write_and_read_back(&mut self, sector: u64, seed: u8) {
        let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        self.mem.write(self.page_offset(0), &pattern).unwrap();
        assert_eq!(self.io(OP_WRITE, 1, sector, 0), RSP_OKAY);
        assert_eq!(self.io(OP_READ, 2, sector, 1), RSP_OKAY);
        let mut back = vec![0u8; PAGE_SIZE];
        self.mem.read(self.page_offset(1), &mut back).unwrap();
        assert_eq!(back, pattern);
    }
}

/// Opens "1" (kept weakly so the test can see it dropped) and "ro"; refuses anything else.
struct Opener {
    disk: Mutex<Weak<dyn BlockDevice>>,
}

impl DiskOpener for Opener {
    fn open(&self, target: &str) -> std::result::Result<Arc<dyn BlockDevice>, String> {
        match target {
            "1" => {
                let d: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(DISK_BYTES));
                *self.disk.lock() = Arc::downgrade(&d);
                Ok(d)
            }
            "ro" => Ok(Arc::new(MemDisk::new(DISK_BYTES).into_read_only())),
            "2" => Ok(Arc::new(MemDisk::new(DISK_BYTES))),
            other => Err(format!("no VDI named '{other}'")),
        }
    }
}

fn options() -> XenBackendOptions {
    XenBackendOptions { backend_domid: 0, server: ServerOptions { workers: 2 }, max_queues: 4 }
}

/// Runs the backend on a thread for the duration of `body`.
fn with_backend(body: impl FnOnce(&MemStore, &SimConnector, &Opener, &Mutex<Vec<BackendEvent>>)) {
    let store = MemStore::new();
    let conn = SimConnector::default();
    let opener = Arc::new(Opener { disk: Mutex::new(Weak::<MemDisk>::new()) });
    let events = Mutex::new(Vec::new());
    let stop = shutdown::Shutdown::new().unwrap();
    std::thread::scope(|s| {
        let backend = s.spawn(|| {
            let opener: Arc<dyn DiskOpener> = opener.clone();
            run(&store, &conn, opener, &options(), &stop, &mut |e| events.lock().push(e.clone()))
        });
        // A failed assertion in `body` must still stop the backend, or the scope never ends.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&store, &conn, &opener, &events)));
        stop.trigger();
        backend.join().unwrap().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
}

#[test]
fn handshake_connects_serves_and_closes() {
    with_backend(|store, conn, opener, events| {
        let b = back_dir(5, 768);
        toolstack_add(store, 5, 768, "parallax:1", "w");
        wait_state(store, &b, "2");
        let key = |k: &str| store.read(&format!("{b}/{k}")).unwrap();
        for (k, v) in [
            ("feature-flush-cache", "1"),
            ("feature-barrier", "1"),
            ("feature-discard", "1"),
            ("discard-granularity", "4096"),
            ("discard-alignment", "0"),
            ("feature-max-indirect-segments", "256"),
            ("max-ring-page-order", "4"),
            ("multi-queue-max-queues", "4"),
        ] {
            assert_eq!(key(k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(key("sectors"), None, "disk facts come with Connected");

        let mut front = Front::connect(store, conn, 5, 768, 0, Abi::X86_64);
        wait_state(store, &b, "4");
        assert_eq!(key("sectors"), Some((DISK_BYTES / 512).to_string()));
        assert_eq!(key("sector-size").as_deref(), Some("512"));
        assert_eq!(key("physical-sector-size").as_deref(), Some("4096"));
        assert_eq!(key("info").as_deref(), Some("0"));
        front.write_and_read_back(8, 3);
        // The data really reached the disk the opener handed out.
        let disk = opener.disk.lock().upgrade().unwrap();
        let mut first = [0u8; 2];
        disk.read_at(8 * 512, &mut first).unwrap();
        assert_eq!(first, [3, 34]);
        drop(disk);

        // The frontend closing is mirrored (blkfront and kexec's reset wait for our Closing);
        // Closed follows the frontend's Closed.
        store.write(&format!("{}/state", front_dir(5, 768)), "5").unwrap();
        wait_state(store, &b, "5");
        wait_until("the disk to be released", || opener.disk.lock().upgrade().is_none());
        // Let the backend step this device again with the frontend still Closing: two more
        // devices, each discovered in a later pass, prove a whole pass went by.
        for other in [60, 61] {
            toolstack_add(store, other, 768, "2", "w");
            let dir = back_dir(other, 768);
            wait_until("a later pass", || {
                events.lock().iter().any(|e| matches!(e, BackendEvent::Opened { device, .. } if *device == dir))
            });
        }
        assert_eq!(key("state").as_deref(), Some("5"), "Closed only after the frontend is Closed");
        store.write(&format!("{}/state", front_dir(5, 768)), "6").unwrap();
        wait_state(store, &b, "6");
        toolstack_remove(store, 5, 768);
        wait_until("removal", || events.lock().iter().any(|e| matches!(e, BackendEvent::Removed { .. })));
        // This device's events (devices 60 and 61 only marked passes).
        let seen: Vec<BackendEvent> = events
            .lock()
            .iter()
            .filter(|e| !matches!(e, BackendEvent::Opened { device, .. } if *device != b))
            .cloned()
            .collect();
        assert!(matches!(seen[0], BackendEvent::Opened { ref target, .. } if target == "1"), "{seen:?}");
        assert!(
            matches!(seen[1], BackendEvent::Connected { ring_pages: 1, queues: 1, protocol: Abi::X86_64, .. }),
            "{seen:?}"
        );
        assert!(matches!(seen[2], BackendEvent::Closed { .. }), "{seen:?}");
    });
}

#[test]
fn hostile_or_broken_devices_fail_alone() {
    with_backend(|store, conn, _opener, events| {
        // A: ring order above what we offer.
        toolstack_add(store, 7, 768, "parallax:2", "w");
        // B: a ring-ref that is not a number.
        toolstack_add(store, 7, 832, "2", "w");
        // C: a VDI that does not exist.
        toolstack_add(store, 8, 768, "parallax:nosuch", "w");
        // D: a ring grant the domain never made.
        toolstack_add(store, 9, 768, "parallax:2", "w");
        // E: a good 4-page ring of a 32-bit guest, next to all of them.
        toolstack_add(store, 10, 768, "parallax:2", "w");
        // F: attached read-only.
        toolstack_add(store, 11, 768, "parallax:2", "r");

        wait_state(store, &back_dir(8, 768), "5");
        let err = store.read(&format!("{}/hotplug-error", back_dir(8, 768))).unwrap().unwrap();
        assert!(err.contains("nosuch"), "{err}");
        for (f, d) in [(7, 768), (7, 832), (9, 768), (10, 768), (11, 768)] {
            wait_state(store, &back_dir(f, d), "2");
        }

        let fa = front_dir(7, 768);
        store.write(&format!("{fa}/ring-ref"), "0").unwrap();
        store.write(&format!("{fa}/ring-page-order"), "9").unwrap();
        store.write(&format!("{fa}/event-channel"), "3").unwrap();
        store.write(&format!("{fa}/state"), "3").unwrap();
        let fb = front_dir(7, 832);
        store.write(&format!("{fb}/ring-ref"), "abc").unwrap();
        store.write(&format!("{fb}/event-channel"), "4").unwrap();
        store.write(&format!("{fb}/state"), "3").unwrap();
        // Published before the state: written after it, the backend (woken by the state at
        // once) could connect the good ring first.
        let _d = Front::connect_with_ring_ref(store, conn, 9, 768, 0, Abi::X86_64, "4000");
        let mut e = Front::connect(store, conn, 10, 768, 2, Abi::X86_32);
        let mut f = Front::connect(store, conn, 11, 768, 0, Abi::X86_64);

        for (fr, dv, needle) in [(7, 768, "ring-page-order"), (7, 832, "abc"), (9, 768, "4000")] {
            let dir = back_dir(fr, dv);
            wait_state(store, &dir, "5");
            let msg = store.read(&format!("{dir}/error")).unwrap().unwrap_or_default();
            assert!(msg.contains(needle), "{dir}: {msg}");
        }
        wait_state(store, &back_dir(10, 768), "4");
        wait_state(store, &back_dir(11, 768), "4");
        e.write_and_read_back(100, 9);
        assert_eq!(store.read(&format!("{}/info", back_dir(11, 768))).unwrap().as_deref(), Some("4"));
        assert_ne!(f.io(OP_WRITE, 7, 0, 0), RSP_OKAY, "a read-only disk refuses writes");
        assert_eq!(f.io(OP_READ, 8, 0, 1), RSP_OKAY);

        // The failed frontends close; their backends follow to Closed.
        store.write(&format!("{fa}/state"), "6").unwrap();
        wait_state(store, &back_dir(7, 768), "6");
        // A frontend that vanishes (guest destroyed) while connected: the ring stops.
        toolstack_remove(store, 10, 768);
        let gone = BackendEvent::Removed { device: back_dir(10, 768) };
        wait_until("removal of the connected device", || events.lock().contains(&gone));
        // The healthy read-only device is still served.
        assert_eq!(f.io(OP_READ, 9, 8, 1), RSP_OKAY);
    });
}

#[test]
fn a_frontend_that_was_connected_before_is_not_taken_over() {
    with_backend(|store, _conn, _opener, _events| {
        toolstack_add(store, 12, 768, "parallax:2", "w");
        // Pretend an earlier backend connected it, then this backend started.
        store.write(&format!("{}/state", front_dir(12, 768)), "4").unwrap();
        let b = back_dir(12, 768);
        wait_until("a verdict", || store.read(&format!("{b}/state")).unwrap().as_deref() != Some("1"));
        assert_eq!(store.read(&format!("{b}/state")).unwrap().as_deref(), Some("5"));
        assert!(store.read(&format!("{b}/hotplug-error")).unwrap().unwrap().contains("earlier backend"));
    });
}

/// Runs one backend until `body` returns, then stops it; returns what it reported.
fn serve_while(
    store: &MemStore,
    conn: &SimConnector,
    opener: &Arc<dyn DiskOpener>,
    body: impl FnOnce(&Mutex<Vec<BackendEvent>>),
) -> Vec<BackendEvent> {
    serve_while_with(store, conn, opener, &options(), body)
}

/// [`serve_while`] with a backend configured by `opts`.
fn serve_while_with(
    store: &MemStore,
    conn: &SimConnector,
    opener: &Arc<dyn DiskOpener>,
    opts: &XenBackendOptions,
    body: impl FnOnce(&Mutex<Vec<BackendEvent>>),
) -> Vec<BackendEvent> {
    let stop = shutdown::Shutdown::new().unwrap();
    let events = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let backend = s.spawn(|| run(store, conn, opener.clone(), opts, &stop, &mut |e| events.lock().push(e.clone())));
        // A failed assertion in `body` must still stop the backend, or the scope never ends.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&events)));
        stop.trigger();
        backend.join().unwrap().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
    events.into_inner()
}

#[test]
fn a_restarted_backend_resumes_the_ring_the_last_one_left() {
    let store = MemStore::new();
    let conn = SimConnector::default();
    toolstack_add(&store, 13, 768, "2", "w");
    let counted = Arc::new(FlushFails::new(false));
    let disk: Arc<dyn BlockDevice> = counted.clone();
    let opener: Arc<dyn DiskOpener> = Arc::new(move |_: &str| Ok(disk.clone()));
    let b = back_dir(13, 768);
    let key = |k: &str| store.read(&format!("{b}/{k}")).unwrap();
    let mut front = None;
    let seen = serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "2");
        let mut f = Front::connect(&store, &conn, 13, 768, 1, Abi::X86_64);
        wait_state(&store, &b, "4");
        f.write_and_read_back(0, 1);
        front = Some(f);
    });
    let mut front = front.unwrap();
    // Stopping left the guest connected, with the ring's index recorded (two requests answered).
    assert_eq!(key("state").as_deref(), Some("4"));
    // The guest sent no flush, but the backend flushed before recording the detach:
    // everything acknowledged is durable when the next backend takes over.
    assert!(counted.1.load(std::sync::atomic::Ordering::SeqCst) >= 1, "no flush before detaching");
    // Index 2, the ring's two grants, the frontend's port.
    assert_eq!(key(DETACHED_KEY).as_deref(), Some("2 0,1 778"));
    assert!(seen.iter().any(|e| matches!(e, BackendEvent::Detached { indices, .. } if indices == &[2])), "{seen:?}");

    // The guest writes while no backend runs; the next backend serves it from the ring.
    front.rebind(&conn, 13);
    let pattern = vec![0x5au8; PAGE_SIZE];
    front.mem.write(front.page_offset(0), &pattern).unwrap();
    front.submit(OP_WRITE, 7, 64, 0);
    let seen = serve_while(&store, &conn, &opener, |events| {
        assert_eq!(front.response(7), RSP_OKAY);
        wait_until("resumed", || {
            events
                .lock()
                .iter()
                .any(|e| matches!(e, BackendEvent::Resumed { indices, waiting: 1, .. } if indices == &[2]))
        });
        front.write_and_read_back(16, 2);
        assert_eq!(front.io(OP_READ, 8, 64, 1), RSP_OKAY);
        let mut back = vec![0u8; PAGE_SIZE];
        front.mem.read(front.page_offset(1), &mut back).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(key(DETACHED_KEY), None, "the key is consumed by resuming");
    });
    assert!(seen.iter().any(|e| matches!(e, BackendEvent::Detached { indices, .. } if indices == &[6])), "{seen:?}");

    // A record of another ring (a frontend reloaded while no backend ran): refused.
    let record = key(DETACHED_KEY).unwrap();
    store.write(&format!("{b}/{DETACHED_KEY}"), "6 9,10 778").unwrap();
    front.rebind(&conn, 13);
    serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "5");
        assert!(key("error").unwrap().contains("detached from ring 9,10 778"), "{:?}", key("error"));
    });

    // No record: the backend died (writes acknowledged but not flushed may be lost, requests
    // taken may be unanswered). Even an idle ring is not resumed; the device fails.
    assert_eq!(record, "6 0,1 778");
    store.rm(&format!("{b}/{DETACHED_KEY}")).unwrap();
    store.rm(&format!("{b}/error")).unwrap();
    store.write(&format!("{b}/state"), "4").unwrap();
    front.rebind(&conn, 13);
    serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "5");
        assert!(key("error").unwrap().contains("without detaching"), "{:?}", key("error"));
    });
}

#[test]
fn shutdown_closes_devices_that_are_not_connected() {
    let store = MemStore::new();
    let conn = SimConnector::default();
    toolstack_add(&store, 14, 768, "2", "w");
    let opener: Arc<dyn DiskOpener> =
        Arc::new(|_: &str| Ok(Arc::new(MemDisk::new(DISK_BYTES)) as Arc<dyn BlockDevice>));
    serve_while(&store, &conn, &opener, |_| wait_state(&store, &back_dir(14, 768), "2"));
    assert_eq!(store.read(&format!("{}/state", back_dir(14, 768))).unwrap().as_deref(), Some("6"));
}

/// A [`MemDisk`] that counts its flushes, and fails them (as after an fsync error) if told.
struct FlushFails(MemDisk, std::sync::atomic::AtomicUsize, bool);

impl FlushFails {
    fn new(fail: bool) -> Self {
        Self(MemDisk::new(DISK_BYTES), std::sync::atomic::AtomicUsize::new(0), fail)
    }
}

impl BlockDevice for FlushFails {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> blockdev::DevResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> blockdev::DevResult<()> {
        self.0.write_at(offset, data, fua)
    }
    fn flush(&self) -> blockdev::DevResult<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.2 { Err(blockdev::DevError::Io("fsync: Input/output error".into())) } else { Ok(()) }
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::DevResult<()> {
        self.0.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> blockdev::DevResult<Vec<blockdev::Extent>> {
        self.0.extents(offset, len)
    }
}

#[test]
fn a_failed_empty_flush_fails_the_device_instead_of_answering() {
    // Linux blkfront takes an error on an empty flush as "flushes unsupported" and never
    // flushes again; the backend must not answer it so, but fail the device loudly.
    let store = MemStore::new();
    let conn = SimConnector::default();
    toolstack_add(&store, 15, 768, "2", "w");
    let opener: Arc<dyn DiskOpener> = Arc::new(|_: &str| Ok(Arc::new(FlushFails::new(true)) as Arc<dyn BlockDevice>));
    let b = back_dir(15, 768);
    serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "2");
        let mut front = Front::connect(&store, &conn, 15, 768, 0, Abi::X86_64);
        wait_state(&store, &b, "4");
        front.write_and_read_back(0, 4);
        let flush = Request { operation: OP_FLUSH_DISKCACHE, nr_segments: 0, id: 3, ..Default::default() };
        front.ring.put_request(flush.as_bytes()).unwrap();
        if front.ring.push_requests_and_check_notify().unwrap() {
            let _ = front.events.notify();
        }
        wait_state(&store, &b, "5");
        let error = store.read(&format!("{b}/error")).unwrap().unwrap_or_default();
        assert!(error.contains("flush"), "{error}");
        assert_eq!(front.ring.take_response().unwrap(), None, "the failed flush must not be answered");
    });
}

/// A [`MemStore`] whose `directory` of one path fails while `broken` is set.
struct FlakyStore {
    inner: MemStore,
    broken: Mutex<Option<String>>,
}

impl XenStore for FlakyStore {
    fn read(&self, path: &str) -> Result<Option<String>> {
        self.inner.read(path)
    }
    fn write(&self, path: &str, value: &str) -> Result<()> {
        self.inner.write(path, value)
    }
    fn directory(&self, path: &str) -> Result<Vec<String>> {
        if self.broken.lock().as_deref() == Some(path) {
            return Err(Error::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied)));
        }
        self.inner.directory(path)
    }
    fn rm(&self, path: &str) -> Result<()> {
        self.inner.rm(path)
    }
    fn write_all_in(&self, dir: &str, writes: &[(&str, &str)]) -> Result<bool> {
        self.inner.write_all_in(dir, writes)
    }
    fn watch(&self, path: &str) -> Result<()> {
        self.inner.watch(path)
    }
    fn unwatch(&self, path: &str) -> Result<()> {
        self.inner.unwatch(path)
    }
    fn events(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.events()
    }
    fn take_events(&self) -> Vec<String> {
        self.inner.take_events()
    }
}

#[test]
fn a_frontend_directory_that_cannot_be_listed_affects_only_its_devices() {
    let store = FlakyStore { inner: MemStore::new(), broken: Mutex::new(None) };
    let conn = SimConnector::default();
    toolstack_add(&store.inner, 16, 768, "2", "w");
    toolstack_add(&store.inner, 17, 768, "2", "w");
    let opener: Arc<dyn DiskOpener> =
        Arc::new(|_: &str| Ok(Arc::new(MemDisk::new(DISK_BYTES)) as Arc<dyn BlockDevice>));
    let stop = shutdown::Shutdown::new().unwrap();
    let events = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let backend =
            s.spawn(|| run(&store, &conn, opener.clone(), &options(), &stop, &mut |e| events.lock().push(e.clone())));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for front in [16, 17] {
                wait_state(&store.inner, &back_dir(front, 768), "2");
            }
            let mut a = Front::connect(&store.inner, &conn, 16, 768, 0, Abi::X86_64);
            wait_state(&store.inner, &back_dir(16, 768), "4");
            // Listing domain 16's directory fails for a while: its ring keeps serving, it is
            // not taken for removed, and domain 17 still connects.
            *store.broken.lock() = Some(format!("{}/16", keys::backend_root(0)));
            let mut b = Front::connect(&store.inner, &conn, 17, 768, 0, Abi::X86_64);
            wait_state(&store.inner, &back_dir(17, 768), "4");
            a.write_and_read_back(0, 5);
            b.write_and_read_back(0, 6);
            *store.broken.lock() = None;
            a.write_and_read_back(8, 7);
            assert!(!events.lock().iter().any(|e| matches!(e, BackendEvent::Removed { .. })), "{:?}", events.lock());
        }));
        stop.trigger();
        backend.join().unwrap().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
}

#[test]
fn a_garbled_frontend_state_fails_the_device_once_and_the_backend_settles() {
    with_backend(|store, conn, _opener, events| {
        let b = back_dir(20, 768);
        toolstack_add(store, 20, 768, "parallax:2", "w");
        wait_state(store, &b, "2");
        let _front = Front::connect(store, conn, 20, 768, 0, Abi::X86_64);
        wait_state(store, &b, "4");
        // The guest writes a state that means nothing. The report of it is a write under the
        // backend's own watched root; failing again at every wake would spin forever.
        store.write(&format!("{}/state", front_dir(20, 768)), "x").unwrap();
        // Reported, the ring stopped and joined, and the device closed (the garbled frontend
        // counts as gone once reported).
        wait_state(store, &b, "6");
        // Two later passes, each proven by a device discovered in it.
        for other in [70, 71] {
            toolstack_add(store, other, 768, "2", "w");
            let dir = back_dir(other, 768);
            wait_until("a later pass", || {
                events.lock().iter().any(|e| matches!(e, BackendEvent::Opened { device, .. } if *device == dir))
            });
        }
        let failures =
            events.lock().iter().filter(|e| matches!(e, BackendEvent::Failed { device, .. } if *device == b)).count();
        assert_eq!(failures, 1, "the garbled state was reported {failures} times");
        assert!(store.read(&format!("{b}/error")).unwrap().unwrap().contains("state"));
    });
}

#[test]
fn a_device_whose_disk_cannot_open_closes_when_its_frontend_does() {
    with_backend(|store, _conn, _opener, _events| {
        let b = back_dir(21, 768);
        toolstack_add(store, 21, 768, "parallax:no-such-vdi", "w");
        wait_state(store, &b, "5");
        assert!(store.read(&format!("{b}/hotplug-error")).unwrap().unwrap().contains("no-such-vdi"));
        // The toolstack gives up and closes the frontend: the backend follows to Closed.
        store.write(&format!("{}/state", front_dir(21, 768)), "6").unwrap();
        wait_state(store, &b, "6");
    });
}

#[test]
fn several_queues_are_served_detached_and_resumed_together() {
    let store = MemStore::new();
    let conn = SimConnector::default();
    toolstack_add(&store, 22, 768, "2", "w");
    let disk: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(DISK_BYTES));
    let opener: Arc<dyn DiskOpener> = Arc::new(move |_: &str| Ok(disk.clone()));
    let b = back_dir(22, 768);
    let key = |k: &str| store.read(&format!("{b}/{k}")).unwrap();
    let pattern = vec![0xa5u8; PAGE_SIZE];
    let mut queues = Vec::new();
    let seen = serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "2");
        assert_eq!(key("multi-queue-max-queues").as_deref(), Some("4"));
        let mut q = Front::connect_queues(&store, &conn, 22, 768, 1, Abi::X86_64, 3, None);
        wait_state(&store, &b, "4");
        // Every queue is served, and they share one disk: written through queue 0, read
        // through queue 2.
        for (i, front) in q.iter_mut().enumerate() {
            front.write_and_read_back(8 * i as u64, i as u8);
        }
        q[0].mem.write(q[0].page_offset(0), &pattern).unwrap();
        assert_eq!(q[0].io(OP_WRITE, 3, 32, 0), RSP_OKAY);
        assert_eq!(q[2].io(OP_READ, 3, 32, 1), RSP_OKAY);
        let mut back = vec![0u8; PAGE_SIZE];
        q[2].mem.read(q[2].page_offset(1), &mut back).unwrap();
        assert_eq!(back, pattern);
        queues = q;
    });
    assert!(seen.iter().any(|e| matches!(e, BackendEvent::Connected { queues: 3, ring_pages: 2, .. })), "{seen:?}");
    // Each queue's ring is recorded: its index, its grants, its port.
    assert_eq!(key(DETACHED_KEY).as_deref(), Some("3 0,1 778; 2 2,3 1778; 3 4,5 2778"));
    assert!(seen.iter().any(|e| matches!(e, BackendEvent::Detached { indices, .. } if indices == &[3, 2, 3])));

    // While no backend runs, the guest queues a write on queue 1; the next backend resumes
    // all three rings where they were, although it offers only two queues to new frontends
    // (restarted with another `max_queues`, or on fewer CPUs).
    for front in &mut queues {
        front.rebind(&conn, 22);
    }
    let other = vec![0x3cu8; PAGE_SIZE];
    queues[1].mem.write(queues[1].page_offset(0), &other).unwrap();
    queues[1].submit(OP_WRITE, 9, 64, 0);
    let fewer = XenBackendOptions { max_queues: 2, ..options() };
    serve_while_with(&store, &conn, &opener, &fewer, |events| {
        assert_eq!(queues[1].response(9), RSP_OKAY);
        wait_until("resumed", || {
            events
                .lock()
                .iter()
                .any(|e| matches!(e, BackendEvent::Resumed { indices, waiting: 1, .. } if indices == &[3, 2, 3]))
        });
        assert_eq!(queues[0].io(OP_READ, 10, 64, 1), RSP_OKAY);
        let mut back = vec![0u8; PAGE_SIZE];
        queues[0].mem.read(queues[0].page_offset(1), &mut back).unwrap();
        assert_eq!(back, other);
        queues[2].write_and_read_back(80, 7);
    });

    // A record of fewer rings than the frontend has (it was reloaded with other queues): refused.
    store.write(&format!("{b}/{DETACHED_KEY}"), "3 0,1 778").unwrap();
    for front in &mut queues {
        front.rebind(&conn, 22);
    }
    serve_while(&store, &conn, &opener, |_| {
        wait_state(&store, &b, "5");
        assert!(
            key("error")
                .unwrap()
                .contains("detached from ring 0,1 778, the frontend now has ring 0,1 778; 2,3 1778; 4,5 2778"),
            "{:?}",
            key("error")
        );
    });
}

#[test]
fn one_broken_queue_takes_the_device_down_with_all_its_queues() {
    with_backend(|store, conn, _opener, events| {
        let b = back_dir(23, 768);
        toolstack_add(store, 23, 768, "parallax:1", "w");
        wait_state(store, &b, "2");
        let mut q = Front::connect_queues(store, conn, 23, 768, 0, Abi::X86_64, 2, None);
        wait_state(store, &b, "4");
        q[0].write_and_read_back(0, 1);
        // Queue 1 claims more requests than its ring holds: that ring's server fails.
        q[1].ring.set_req_prod_raw(1000).unwrap();
        let _ = q[1].events.notify();
        // The error is published, the other queue's ring is stopped too, and only once both
        // threads have ended is the state Closing.
        wait_state(store, &b, "5");
        assert!(store.read(&format!("{b}/error")).unwrap().is_some());
        let failed =
            events.lock().iter().filter(|e| matches!(e, BackendEvent::Failed { device, .. } if *device == b)).count();
        assert_eq!(failed, 1);
        // The frontend gives up; the device closes.
        store.write(&format!("{}/state", front_dir(23, 768)), "6").unwrap();
        wait_state(store, &b, "6");
    });
}

#[test]
fn more_queues_than_offered_fail_the_device() {
    with_backend(|store, conn, _opener, _events| {
        let b = back_dir(24, 768);
        toolstack_add(store, 24, 768, "parallax:2", "w");
        wait_state(store, &b, "2");
        let _q = Front::connect_queues(store, conn, 24, 768, 0, Abi::X86_64, 5, None);
        wait_state(store, &b, "5");
        let error = store.read(&format!("{b}/error")).unwrap().unwrap_or_default();
        assert!(error.contains("multi-queue-num-queues '5'"), "{error}");
    });
}
