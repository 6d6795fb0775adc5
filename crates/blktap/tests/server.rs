//! The concurrent ring server: requests really run in parallel, barriers order, one slow
//! ring does not stall another, stopping answers everything taken, and arbitrary request
//! streams served by any number of workers match a model.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkfront_sim::front::FrontRing;
use blktap::abi::*;
use blktap::engine::Engine;
use blktap::event::{EventChannel, SocketEvents, Wake};
use blktap::grant::SimGrantTable;
use blktap::ring::BackRing;
use blktap::server::{Ended, RingServer, ServerOptions};
use blktap::shm::SharedMem;
use blockdev::{BlockDevice, DevResult, Extent, MemDisk};
use common::{rw_bytes, seg};
use parking_lot::{Condvar, Mutex};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    WriteStart(u64),
    WriteEnd(u64),
    Flush,
}

#[derive(Default)]
struct GateState {
    open: bool,
    inside: usize,
    max_inside: usize,
    log: Vec<Event>,
}

/// A disk whose writes wait at a gate, recording what happens.
struct GatedDisk {
    inner: MemDisk,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl GatedDisk {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Self { inner: MemDisk::new(size), state: Mutex::new(GateState::default()), changed: Condvar::new() })
    }

    fn open(&self) {
        self.state.lock().open = true;
        self.changed.notify_all();
    }

    /// Waits until `n` writes are inside the disk at once.
    fn wait_inside(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        let mut s = self.state.lock();
        while s.inside < n {
            assert!(!self.changed.wait_until(&mut s, deadline).timed_out(), "only {} of {n} writes arrived", s.inside);
        }
    }

    fn log(&self) -> Vec<Event> {
        self.state.lock().log.clone()
    }
}

impl BlockDevice for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        let deadline = Instant::now() + WAIT;
        {
            let mut s = self.state.lock();
            s.log.push(Event::WriteStart(offset));
            s.inside += 1;
            s.max_inside = s.max_inside.max(s.inside);
            self.changed.notify_all();
            while !s.open {
                if self.changed.wait_until(&mut s, deadline).timed_out() {
                    break;
                }
            }
        }
        let r = self.inner.write_at(offset, data, fua);
        let mut s = self.state.lock();
        s.inside -= 1;
        s.log.push(Event::WriteEnd(offset));
        r
    }
    fn flush(&self) -> DevResult<()> {
        self.state.lock().log.push(Event::Flush);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.inner.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
}

/// A frontend in this process and a server on a thread.
struct Rig {
    front: FrontRing,
    events: SocketEvents,
    pages: Arc<SharedMem>,
    stop: shutdown::Shutdown,
    server: Option<JoinHandle<Ended>>,
}

fn rig<D: BlockDevice + 'static>(disk: D, workers: usize, grant_pages: usize, abi: Abi) -> Rig {
    let ring = Arc::new(SharedMem::anonymous(PAGE_SIZE).unwrap());
    let pages = Arc::new(SharedMem::anonymous(grant_pages * PAGE_SIZE).unwrap());
    let front = FrontRing::init(ring.clone(), abi).unwrap();
    let back = BackRing::new(ring, abi).unwrap();
    let (fe, be) = UnixStream::pair().unwrap();
    let engine = Engine::new(disk, SimGrantTable::new(pages.clone()).unwrap());
    let server = RingServer::new(back, engine, SocketEvents::new(be), ServerOptions { workers });
    let stop = shutdown::Shutdown::new().unwrap();
    let s = stop.clone();
    let handle = std::thread::spawn(move || server.run(&s).unwrap());
    Rig { front, events: SocketEvents::new(fe), pages, stop, server: Some(handle) }
}

impl Rig {
    fn send(&mut self, reqs: &[Vec<u8>]) {
        for r in reqs {
            self.front.put_request(r).unwrap();
        }
        if self.front.push_requests_and_check_notify().unwrap() {
            self.events.notify().unwrap();
        }
    }

    /// Waits for `n` responses.
    fn responses(&mut self, n: usize) -> Vec<(u64, u8, i16)> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            while let Some(r) = self.front.take_response().unwrap() {
                out.push(r);
            }
            if out.len() < n && !self.front.final_check_for_responses().unwrap() {
                assert!(Instant::now() < deadline, "only {} of {n} responses", out.len());
                assert_ne!(self.events.wait(Duration::from_millis(200)).unwrap(), Wake::Closed);
            }
        }
        out
    }

    /// True if a response is already published.
    fn has_response(&mut self) -> bool {
        self.front.final_check_for_responses().unwrap()
    }

    fn finish(mut self) -> Ended {
        self.stop.trigger();
        self.server.take().unwrap().join().unwrap()
    }
}

fn write(id: u64, sector: u64, gref: u32) -> Vec<u8> {
    rw_bytes(Abi::X86_64, OP_WRITE, id, sector, 1, &[seg(gref, 0, 7)])
}

#[test]
fn requests_of_one_ring_run_concurrently_up_to_the_worker_count() {
    let disk = GatedDisk::new(1 << 20);
    let mut r = rig(disk.clone(), 4, 8, Abi::X86_64);
    r.send(&(0..8).map(|i| write(i + 1, i * 8, i as u32)).collect::<Vec<_>>());
    disk.wait_inside(4);
    assert!(!r.has_response(), "a write finished while the gate was closed");
    disk.open();
    let got = r.responses(8);
    assert!(got.iter().all(|&(_, op, st)| op == OP_WRITE && st == RSP_OKAY), "{got:?}");
    let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
    ids.sort();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    assert_eq!(disk.state.lock().max_inside, 4);
    r.finish();
}

#[test]
fn a_barrier_waits_for_earlier_requests_and_later_ones_wait_for_it() {
    let disk = GatedDisk::new(1 << 20);
    let mut r = rig(disk.clone(), 4, 8, Abi::X86_64);
    r.send(&[write(1, 0, 0), rw_bytes(Abi::X86_64, OP_WRITE_BARRIER, 2, 8, 1, &[seg(1, 0, 7)]), write(3, 16, 2)]);
    disk.wait_inside(1);
    disk.open();
    let got = r.responses(3);
    assert!(got.iter().all(|g| g.2 == RSP_OKAY), "{got:?}");
    let log = disk.log();
    let at = |e: Event| log.iter().position(|&x| x == e).unwrap_or_else(|| panic!("{e:?} missing from {log:?}"));
    assert!(at(Event::WriteEnd(0)) < at(Event::Flush), "{log:?}");
    assert!(at(Event::Flush) < at(Event::WriteStart(4096)), "{log:?}");
    assert!(at(Event::WriteEnd(4096)) < at(Event::WriteStart(8192)), "{log:?}");
    r.finish();
}

#[test]
fn a_stalled_ring_does_not_stall_another() {
    let slow = GatedDisk::new(1 << 20);
    let mut a = rig(slow.clone(), 2, 4, Abi::X86_64);
    let mut b = rig(MemDisk::new(1 << 20), 2, 4, Abi::X86_32);
    a.send(&[write(1, 0, 0)]);
    slow.wait_inside(1);
    for round in 0..50u64 {
        b.send(&[
            rw_bytes(Abi::X86_32, OP_WRITE, round * 2, round * 8, 1, &[seg(0, 0, 7)]),
            rw_bytes(Abi::X86_32, OP_READ, round * 2 + 1, round * 8, 1, &[seg(1, 0, 7)]),
        ]);
        assert!(b.responses(2).iter().all(|g| g.2 == RSP_OKAY));
    }
    assert!(!a.has_response(), "the stalled write finished before its gate opened");
    slow.open();
    assert_eq!(a.responses(1), vec![(1, OP_WRITE, RSP_OKAY)]);
    a.finish();
    b.finish();
}

#[test]
fn stopping_answers_every_request_taken() {
    let disk = GatedDisk::new(1 << 20);
    let mut r = rig(disk.clone(), 4, 8, Abi::X86_64);
    r.send(&(0..4).map(|i| write(i + 1, i * 8, i as u32)).collect::<Vec<_>>());
    disk.wait_inside(4);
    r.stop.trigger();
    disk.open();
    let got = r.responses(4);
    assert!(got.iter().all(|g| g.2 == RSP_OKAY));
    assert_eq!(r.finish(), Ended::Stopped);
}

#[test]
fn a_frontend_that_goes_away_ends_the_ring() {
    let r = rig(MemDisk::new(1 << 20), 2, 4, Abi::X86_64);
    let Rig { events, server, .. } = r;
    drop(events);
    assert_eq!(server.unwrap().join().unwrap(), Ended::PeerGone);
}

/// A disk whose writes at offset 0 panic (a bug in device code, not guest input).
struct PanickyDisk(MemDisk);

impl BlockDevice for PanickyDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
        assert_ne!(offset, 0, "injected device bug");
        self.0.write_at(offset, data, fua)
    }
    fn flush(&self) -> DevResult<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.0.discard(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.0.extents(offset, len)
    }
}

#[test]
fn a_panicking_device_answers_an_error_and_the_ring_goes_on() {
    let mut r = rig(PanickyDisk(MemDisk::new(1 << 20)), 2, 4, Abi::X86_64);
    r.send(&[write(1, 0, 0), write(2, 8, 1)]);
    let mut got = r.responses(2);
    got.sort();
    assert_eq!(got, vec![(1, OP_WRITE, RSP_ERROR), (2, OP_WRITE, RSP_OKAY)]);
    // A barrier drains in-flight requests: the panicked one must not count for ever.
    r.send(&[rw_bytes(Abi::X86_64, OP_WRITE_BARRIER, 3, 16, 1, &[seg(2, 0, 7)])]);
    assert_eq!(r.responses(1), vec![(3, OP_WRITE_BARRIER, RSP_OKAY)]);
    assert_eq!(r.finish(), Ended::Stopped);
}

// ---------- proptest: arbitrary batches served by any number of workers ----------

const SLOTS: u64 = 24; // requests per batch, each with its own disk region and grant pages
const REGION: u64 = 64; // sectors
const DISK: u64 = SLOTS * REGION * 512;
const GRANTS: usize = SLOTS as usize * 2;

#[derive(Debug, Clone)]
enum Op {
    Rw {
        write: bool,
        at: u64,
        segs: Vec<(bool, u8, u8)>,
        nr_override: Option<u8>,
    },
    Barrier {
        at: u64,
    },
    Discard {
        at: u64,
        n: u64,
    },
    Flush,
    /// An 8-sector transfer starting `back` (< 8) sectors before the end of the disk.
    PastEnd {
        write: bool,
        back: u64,
    },
    Unknown(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<bool>(), 0u64..REGION - 16, prop::collection::vec((any::<bool>(), 0u8..9, 0u8..9), 1..3),
              prop::option::weighted(0.1, prop_oneof![Just(0u8), Just(12u8)]))
            .prop_map(|(write, at, segs, nr_override)| Op::Rw { write, at, segs, nr_override }),
        1 => (0u64..REGION - 8).prop_map(|at| Op::Barrier { at }),
        2 => (0u64..REGION, 0u64..REGION).prop_map(|(at, n)| Op::Discard { at, n }),
        1 => Just(Op::Flush),
        1 => (any::<bool>(), 1u64..8).prop_map(|(write, back)| Op::PastEnd { write, back }),
        1 => prop_oneof![Just(4u8), Just(9u8)].prop_map(Op::Unknown),
    ]
}

/// Encodes op `i` (its region starts at sector i*REGION, its pages are grants 2i and 2i+1;
/// a segment whose flag is false names a grant that does not exist) and applies it to the model.
fn encode_and_apply(i: u64, op: &Op, id: u64, disk: &mut [u8], pages: &mut [u8]) -> (Vec<u8>, i16) {
    let base = i * REGION;
    let gref = |k: usize, valid: bool| if valid { (2 * i) as u32 + k as u32 } else { 10_000 };
    match op {
        Op::Rw { write, at, segs, nr_override } => {
            let code = if *write { OP_WRITE } else { OP_READ };
            let s: Vec<Segment> = segs.iter().enumerate().map(|(k, &(v, f, l))| seg(gref(k, v), f, l)).collect();
            let nr = nr_override.unwrap_or(s.len() as u8);
            let bytes = rw_bytes(Abi::X86_64, code, id, base + at, nr, &s);
            let len: u64 = segs.iter().map(|&(_, f, l)| u64::from(l.saturating_sub(f)) + 1).sum();
            let valid = nr_override.is_none() && segs.iter().all(|&(v, f, l)| v && f <= l && l < 8);
            assert!(at + len <= REGION);
            if !valid {
                return (bytes, RSP_ERROR);
            }
            let mut pos = ((base + at) * 512) as usize;
            for (k, &(_, f, l)) in segs.iter().enumerate() {
                let p = gref(k, true) as usize * PAGE_SIZE + f as usize * 512;
                let n = (l - f + 1) as usize * 512;
                if *write {
                    disk[pos..pos + n].copy_from_slice(&pages[p..p + n]);
                } else {
                    pages[p..p + n].copy_from_slice(&disk[pos..pos + n]);
                }
                pos += n;
            }
            (bytes, RSP_OKAY)
        }
        Op::Barrier { at } => {
            let bytes = rw_bytes(Abi::X86_64, OP_WRITE_BARRIER, id, base + at, 1, &[seg(gref(0, true), 0, 7)]);
            let p = gref(0, true) as usize * PAGE_SIZE;
            let pos = ((base + at) * 512) as usize;
            disk[pos..pos + 4096].copy_from_slice(&pages[p..p + 4096]);
            (bytes, RSP_OKAY)
        }
        Op::Discard { at, n } => {
            let n = (*n).min(REGION - at);
            let bytes = blktap_discard(id, base + at, n);
            let pos = ((base + at) * 512) as usize;
            disk[pos..pos + n as usize * 512].fill(0);
            (bytes, RSP_OKAY)
        }
        Op::Flush => (rw_bytes(Abi::X86_64, OP_FLUSH_DISKCACHE, id, 0, 0, &[]), RSP_OKAY),
        Op::PastEnd { write, back } => {
            let code = if *write { OP_WRITE } else { OP_READ };
            // Fewer than 8 sectors remain: refused without touching the disk or the page.
            let sector = DISK / 512 - back;
            (rw_bytes(Abi::X86_64, code, id, sector, 1, &[seg(gref(0, true), 0, 7)]), RSP_ERROR)
        }
        Op::Unknown(c) => (rw_bytes(Abi::X86_64, *c, id, base, 1, &[seg(gref(0, true), 0, 7)]), RSP_EOPNOTSUPP),
    }
}

fn blktap_discard(id: u64, sector: u64, n: u64) -> Vec<u8> {
    common::discard_bytes(id, sector, n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_worker_count_serves_arbitrary_batches_like_the_model(
        workers in 1usize..9,
        batches in prop::collection::vec(
            (prop::collection::vec((0usize..GRANTS, any::<u8>()), 0..6), prop::collection::vec(op(), 1..SLOTS as usize)),
            1..4,
        ),
    ) {
        let disk = Arc::new(MemDisk::new(DISK));
        let mut r = rig(disk.clone(), workers, GRANTS, Abi::X86_64);
        let mut model_disk = vec![0u8; DISK as usize];
        let mut model_pages = vec![0u8; GRANTS * PAGE_SIZE];
        let mut id = 0u64;
        for (fills, ops) in &batches {
            for &(g, seed) in fills {
                let bytes: Vec<u8> = (0..PAGE_SIZE).map(|i| seed.wrapping_add((i / 512) as u8)).collect();
                r.pages.write(g * PAGE_SIZE, &bytes).unwrap();
                model_pages[g * PAGE_SIZE..(g + 1) * PAGE_SIZE].copy_from_slice(&bytes);
            }
            let mut reqs = Vec::new();
            let mut want = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                id += 1;
                let (bytes, status) = encode_and_apply(i as u64, op, id, &mut model_disk, &mut model_pages);
                reqs.push(bytes);
                want.push((id, bytes_op(&reqs[reqs.len() - 1]), status));
            }
            r.send(&reqs);
            let mut got = r.responses(reqs.len());
            got.sort();
            prop_assert_eq!(got, want);
        }
        let mut d = vec![0u8; DISK as usize];
        disk.read_at(0, &mut d).unwrap();
        prop_assert!(d == model_disk, "disk differs from the model");
        let mut p = vec![0u8; GRANTS * PAGE_SIZE];
        r.pages.read(0, &mut p).unwrap();
        prop_assert!(p == model_pages, "grant pages differ from the model");
        prop_assert_eq!(r.finish(), Ended::Stopped);
    }
}

fn bytes_op(b: &[u8]) -> u8 {
    b[0]
}
