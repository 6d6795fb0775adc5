//! The vhost-user backend: the device's features and configuration space, and the queues'
//! requests handed to [`crate::request`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockdev::BlockDevice;
use crossbeam_channel::{Receiver, Sender};
use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use crate::ServerOptions;
use crate::guest_io::{self, DataPath};
use crate::request::{self, Buffers, ID_LEN, SECTOR, Segment};
use crate::workers::{Completion, Job, Workers};

// Feature bits (virtio 1.2 §5.2.3 and §6).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
const F_RING_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// Length of the configuration space we fill (up to `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// Largest discard or write-zeroes range in one segment, in sectors.
const MAX_ZERO_SECTORS: u32 = (1 << 30) / SECTOR as u32;

/// Most queues a device offers.
const MAX_QUEUES: usize = 64;
/// Most request threads per queue.
const MAX_WORKERS_PER_QUEUE: usize = 64;
/// Most request threads of one device, whatever its queues.
const MAX_WORKERS: usize = 128;

/// A virtio-blk device for one VMM connection.
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    queues: usize,
    queue_size: usize,
    serial: Arc<[u8]>,
    /// The threads a queue's requests run on, side by side; none with one request at a time
    /// per queue (then they run on the queue's thread).
    workers: Option<Workers>,
    event_idx: AtomicBool,
    /// The guest's memory, and how request data may move to and from it.
    mem: parking_lot::RwLock<(GuestMemoryAtomic<GuestMemoryMmap>, DataPath)>,
    /// One per queue thread: notified to end it.
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Set by [`BlkBackend::stop`]: no new request is taken.
    stopping: AtomicBool,
    /// Queue threads serving requests right now, and a signal for when none is.
    busy: parking_lot::Mutex<usize>,
    idle: parking_lot::Condvar,
}

impl BlkBackend {
    /// A backend serving `dev` as `opts` describe: `opts.queues` queues of at most
    /// `opts.queue_size` descriptors, `opts.workers_per_queue` threads per queue executing
    /// requests, and `opts.serial` as the GET_ID answer (cut to 20 bytes).
    pub fn new(dev: Arc<dyn BlockDevice>, opts: &ServerOptions) -> io::Result<BlkBackend> {
        let queues = opts.queues.clamp(1, MAX_QUEUES);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let serial: Arc<[u8]> = opts.serial.as_bytes()[..opts.serial.len().min(ID_LEN)].into();
        let per_queue = opts.workers_per_queue.clamp(1, MAX_WORKERS_PER_QUEUE);
        let workers = match per_queue {
            1 => None,
            n => Some(Workers::spawn((queues * n).min(MAX_WORKERS), dev.clone(), serial.clone())?),
        };
        Ok(BlkBackend {
            workers,
            dev,
            queues,
            queue_size: opts.queue_size.clamp(16, 1024).next_power_of_two(),
            serial,
            event_idx: AtomicBool::new(false),
            mem: parking_lot::RwLock::new((GuestMemoryAtomic::new(GuestMemoryMmap::new()), DataPath::Bounce)),
            exits,
            stopping: AtomicBool::new(false),
            busy: parking_lot::Mutex::new(0),
            idle: parking_lot::Condvar::new(),
        })
    }

    /// Ends every queue thread and waits until the requests they had taken are done and
    /// returned to the guest: after it, nothing writes to the device any more.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
        let mut busy = self.busy.lock();
        while *busy > 0 {
            self.idle.wait(&mut busy);
        }
    }

    /// The configuration space (virtio 1.2 §5.2.4), little-endian.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let sectors = self.dev.size() / SECTOR;
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        // seg_max: the ring's descriptors less the header and the status.
        c[12..16].copy_from_slice(&(self.queue_size as u32 - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // Topology: 4 KiB physical blocks (2^3 sectors), 4 KiB minimum and optimal I/O.
        let block = self.dev.block_size().max(SECTOR as u32);
        c[24] = (block / SECTOR as u32).trailing_zeros() as u8;
        c[26..28].copy_from_slice(&((block / SECTOR as u32) as u16).to_le_bytes());
        c[28..32].copy_from_slice(&(block / SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&(self.queues as u16).to_le_bytes());
        if !self.dev.read_only() {
            c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&1u32.to_le_bytes());
            c[44..48].copy_from_slice(&(block / SECTOR as u32).to_le_bytes());
            c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&1u32.to_le_bytes());
            c[56] = 1;
        }
        c
    }

    /// Serves every request the driver has made available on the queue, holding the queue's
    /// lock throughout: a VMM stopping or resetting the ring (`GET_VRING_BASE`) waits until the
    /// requests taken are done and returned, so none completes into a ring that was reset.
    fn serve_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        {
            let mut busy = self.busy.lock();
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            *busy += 1;
        }
        let result = self.serve_queue_busy(vring);
        let mut busy = self.busy.lock();
        *busy -= 1;
        self.idle.notify_all();
        result
    }

    fn serve_queue_busy(&self, vring: &VringRwLock) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut flight = InFlight::new();
        let result = self.serve_available(&mut state, event_idx, &mut flight);
        // However serving ended, every request handed to a worker is finished before the queue
        // is let go: after `stop` nothing writes to the device, and nothing completes into a
        // ring that was reset. (After an error the ring is not touched again.)
        flight.wait_all();
        result
    }

    /// Takes the available chains and keeps them executing on the workers, adding each to the
    /// used ring as it completes and taking new ones meanwhile, until nothing is available or
    /// in flight (and, with event indexes, nothing arrived while notifications were off).
    fn serve_available(&self, state: &mut Vring, event_idx: bool, flight: &mut InFlight) -> io::Result<()> {
        loop {
            if event_idx {
                state.disable_notification().map_err(queue_err)?;
            }
            loop {
                if !self.stopping.load(Ordering::Acquire) {
                    self.take_available(state, event_idx, flight)?;
                }
                if flight.count == 0 {
                    break;
                }
                // Wait for one request to finish, then return every one finished by now and
                // notify the driver once for all of them.
                for done in flight.next_completions() {
                    state.add_used(done.head, done.used).map_err(queue_err)?;
                }
                signal(state, event_idx)?;
            }
            if self.stopping.load(Ordering::Acquire) {
                return Ok(());
            }
            // With event indexes, go on until the driver has added nothing since notifications
            // were turned back on, so no request waits for a kick that will not come.
            if !event_idx || !state.enable_notification().map_err(queue_err)? {
                return Ok(());
            }
        }
    }

    /// Takes every chain the driver has made available. A lone request with nothing else in
    /// flight runs right here (no hand-off on the latency path, and it is returned at once), and
    /// so does every request of a backend without workers (one request at a time per queue);
    /// otherwise each goes to a worker.
    fn take_available(&self, state: &mut Vring, event_idx: bool, flight: &mut InFlight) -> io::Result<()> {
        loop {
            let (mem, path) = {
                let current = self.mem.read();
                (current.0.memory(), current.1)
            };
            let chains: Vec<_> = state.get_queue_mut().iter(mem.clone()).map_err(queue_err)?.collect();
            if chains.is_empty() {
                return Ok(());
            }
            let lone = chains.len() == 1 && flight.count == 0;
            let Some(workers) = self.workers.as_ref().filter(|_| !lone) else {
                for chain in &chains {
                    let used = request::execute(&*self.dev, &mem, path, &buffers_of(chain), &self.serial);
                    state.add_used(chain.head_index(), used).map_err(queue_err)?;
                }
                signal(state, event_idx)?;
                continue;
            };
            let shared = mem.into_inner();
            for chain in &chains {
                workers.submit(Job::new(
                    chain.head_index(),
                    buffers_of(chain),
                    (shared.clone(), path),
                    flight.done.clone(),
                ));
                flight.count += 1;
            }
            return Ok(());
        }
    }
}

/// A queue's state, as the queue's lock hands it out.
type Vring = VringState<GuestMemoryAtomic<GuestMemoryMmap>>;

fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

/// Notifies the driver of used requests, unless event indexes say it does not want it yet.
fn signal(state: &mut Vring, event_idx: bool) -> io::Result<()> {
    if !event_idx || state.needs_notification().map_err(queue_err)? {
        state.signal_used_queue()?;
    }
    Ok(())
}

/// The buffers of one descriptor chain, in the order the device reads and writes them.
fn buffers_of<M: Clone + std::ops::Deref<Target = GuestMemoryMmap>>(chain: &DescriptorChain<M>) -> Buffers {
    let mut b = Buffers::default();
    for d in chain.clone() {
        let s = Segment { addr: d.addr(), len: d.len() };
        if d.is_write_only() {
            b.writable.push(s);
        } else if b.writable.is_empty() {
            b.readable.push(s);
        } else {
            // A readable buffer after a writable one breaks the layout rule: with no header
            // the request fails, and its status byte says so.
            b.readable.clear();
            break;
        }
    }
    b
}

/// The requests one queue thread has handed to the workers and not yet returned.
struct InFlight {
    count: usize,
    done: Sender<Completion>,
    completions: Receiver<Completion>,
    /// The completions taken by the last [`InFlight::next_completions`], kept to reuse its
    /// allocation on every wake-up.
    ready: Vec<Completion>,
}

impl InFlight {
    fn new() -> Self {
        let (done, completions) = crossbeam_channel::unbounded();
        InFlight { count: 0, done, completions, ready: Vec::new() }
    }

    /// Waits for one completion (there must be a request in flight), then takes every other
    /// one already there.
    fn next_completions(&mut self) -> &[Completion] {
        debug_assert!(self.count > 0);
        self.ready.clear();
        // `self.done` keeps the channel open, and every job sends its completion.
        match self.completions.recv() {
            Ok(first) => {
                self.ready.push(first);
                self.ready.extend(self.completions.try_iter());
                self.count -= self.ready.len();
            }
            Err(_) => self.count = 0,
        }
        &self.ready
    }

    /// Waits until every request handed out has completed.
    fn wait_all(&mut self) {
        while self.count > 0 {
            self.next_completions();
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_TOPOLOGY
            | F_FLUSH
            | F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.dev.read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let path = guest_io::data_path(&mem.memory());
        if path == DataPath::Bounce {
            tracing::info!("guest memory is not all tmpfs/hugetlbfs: request data is copied through a buffer");
        }
        *self.mem.write() = (mem, path);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize).saturating_add(size as usize).min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!(device_event, "event for a queue that does not exist");
            return Ok(());
        };
        self.serve_queue(vring)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use blockdev::{DevError, DevResult, Extent, MemDisk};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const QUEUE_SIZE: u16 = 32;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// A disk whose reads wait until `needed` of them are running at once, and fail if that
    /// does not happen within a few seconds; a read of `panic_at` panics instead.
    struct Rendezvous {
        disk: MemDisk,
        needed: usize,
        panic_at: Option<u64>,
        arrived: parking_lot::Mutex<usize>,
        all_there: parking_lot::Condvar,
    }

    impl Rendezvous {
        fn new(needed: usize, panic_at: Option<u64>) -> Self {
            let (arrived, all_there) = (parking_lot::Mutex::new(0), parking_lot::Condvar::new());
            Rendezvous { disk: MemDisk::new(1 << 20), needed, panic_at, arrived, all_there }
        }
    }

    impl BlockDevice for Rendezvous {
        fn size(&self) -> u64 {
            self.disk.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> DevResult<()> {
            assert_ne!(Some(offset), self.panic_at, "a device bug");
            let mut n = self.arrived.lock();
            *n += 1;
            self.all_there.notify_all();
            let deadline = Instant::now() + Duration::from_secs(3);
            while *n < self.needed {
                if self.all_there.wait_until(&mut n, deadline).timed_out() {
                    return Err(DevError::Io(format!("only {} of {} reads ran at once", *n, self.needed)));
                }
            }
            drop(n);
            self.disk.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> DevResult<()> {
            self.disk.write_at(offset, data, fua)
        }
        fn flush(&self) -> DevResult<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
            self.disk.discard(offset, len)
        }
        fn extents(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
            self.disk.extents(offset, len)
        }
    }

    fn buffer_of(request: u64) -> u64 {
        0x10000 + request * 0x2000
    }

    /// Writes `count` 4 KiB reads (request `i` at block `i`) into a split queue in `mem`, as a
    /// driver would: a header, a data buffer and a status byte (0xff until written) each.
    fn queue_reads(mem: &GuestMemoryMmap, count: u16, event_idx: bool) -> VringRwLock {
        let desc = |at: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(at))).unwrap();
        };
        for i in 0..count {
            let (base, head) = (buffer_of(u64::from(i)), 3 * i);
            let mut header = [0u8; 16];
            header[8..16].copy_from_slice(&(u64::from(i) * 8).to_le_bytes());
            mem.write_slice(&header, GuestAddress(base)).unwrap();
            mem.write_slice(&[0xff], GuestAddress(base + 0x20)).unwrap();
            desc(head, base, 16, F_NEXT, head + 1);
            desc(head + 1, base + 0x1000, 4096, F_NEXT | F_WRITE, head + 2);
            desc(head + 2, base + 0x20, 1, F_WRITE, 0);
            mem.write_slice(&head.to_le_bytes(), GuestAddress(AVAIL + 4 + 2 * u64::from(i))).unwrap();
        }
        mem.write_slice(&count.to_le_bytes(), GuestAddress(AVAIL + 2)).unwrap();
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// The used ring: (head, length) of each entry, in order.
    fn used(mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
                (u16::try_from(id).unwrap(), len)
            })
            .collect()
    }

    fn status(mem: &GuestMemoryMmap, request: u64) -> u8 {
        mem.read_obj(GuestAddress(buffer_of(request) + 0x20)).unwrap()
    }

    fn serve(dev: Rendezvous, workers_per_queue: usize, reads: u16, event_idx: bool) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let opts = ServerOptions { queues: 1, workers_per_queue, ..ServerOptions::default() };
        let backend = BlkBackend::new(Arc::new(dev), &opts).unwrap();
        backend.set_event_idx(event_idx);
        backend.update_memory(GuestMemoryAtomic::new(mem.clone())).unwrap();
        let vring = queue_reads(&mem, reads, event_idx);
        backend.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
        mem
    }

    #[test]
    fn requests_in_flight_on_one_queue_run_side_by_side() {
        for event_idx in [false, true] {
            // Each read completes only once four run at once: served one after another, the
            // first would wait for the others and fail.
            let mem = serve(Rendezvous::new(4, None), 4, 4, event_idx);
            let mut used = used(&mem);
            used.sort_unstable();
            assert_eq!(used, [(0, 4097), (3, 4097), (6, 4097), (9, 4097)], "event_idx {event_idx}");
            for r in 0..4 {
                assert_eq!(status(&mem, r), 0, "request {r}, event_idx {event_idx}");
            }
        }
    }

    #[test]
    fn a_device_panic_fails_its_request_and_the_queue_goes_on() {
        // Eight reads, on the queue's thread (one worker per queue) and on two workers; the
        // read of block 5 panics.
        for workers in [1, 2] {
            let mem = serve(Rendezvous::new(1, Some(5 * 4096)), workers, 8, false);
            assert_eq!(used(&mem).len(), 8, "{workers} worker(s)");
            for r in 0..8 {
                assert_eq!(status(&mem, r), if r == 5 { 1 } else { 0 }, "request {r}, {workers} worker(s)");
            }
        }
    }
}
