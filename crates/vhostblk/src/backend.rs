//! The vhost-user backend: the device's features and configuration space, and the queues'
//! requests handed to [`crate::request`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockdev::BlockDevice;
use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use crate::request::{self, Buffers, ID_LEN, SECTOR, Segment};

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

/// A virtio-blk device for one VMM connection.
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    queues: usize,
    queue_size: usize,
    serial: Vec<u8>,
    event_idx: AtomicBool,
    mem: parking_lot::RwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// One per queue thread: notified to end it.
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Set by [`BlkBackend::stop`]: no new request is taken.
    stopping: AtomicBool,
    /// Queue threads serving requests right now, and a signal for when none is.
    busy: parking_lot::Mutex<usize>,
    idle: parking_lot::Condvar,
}

impl BlkBackend {
    /// A backend serving `dev` on `queues` queues of at most `queue_size` descriptors;
    /// `serial` is the GET_ID answer (cut to 20 bytes).
    pub fn new(dev: Arc<dyn BlockDevice>, queues: usize, queue_size: usize, serial: &str) -> io::Result<BlkBackend> {
        let queues = queues.clamp(1, 64);
        let exits = (0..queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            dev,
            queues,
            queue_size: queue_size.clamp(16, 1024).next_power_of_two(),
            serial: serial.as_bytes()[..serial.len().min(ID_LEN)].to_vec(),
            event_idx: AtomicBool::new(false),
            mem: parking_lot::RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
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
        let mem = self.mem.read().memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let err = |e: virtio_queue::Error| io::Error::other(format!("virtqueue: {e}"));
        let mut state = vring.get_mut();
        loop {
            if event_idx {
                state.disable_notification().map_err(err)?;
            }
            let chains: Vec<_> = state.get_queue_mut().iter(mem.clone()).map_err(err)?.collect();
            for chain in &chains {
                let mut b = Buffers::default();
                for d in chain.clone() {
                    let s = Segment { addr: d.addr(), len: d.len() };
                    if d.is_write_only() {
                        b.writable.push(s);
                    } else if b.writable.is_empty() {
                        b.readable.push(s);
                    } else {
                        // A readable buffer after a writable one breaks the layout rule: with
                        // no header the request fails, and its status byte says so.
                        b.readable.clear();
                        break;
                    }
                }
                let used = request::execute(&*self.dev, &*mem, &b, &self.serial);
                state.add_used(chain.head_index(), used).map_err(err)?;
            }
            if !chains.is_empty() && (!event_idx || state.needs_notification().map_err(err)?) {
                state.signal_used_queue()?;
            }
            // With event indexes, go on until the driver has added nothing since notifications
            // were turned back on, so no request waits for a kick that will not come.
            if !event_idx || !state.enable_notification().map_err(err)? {
                return Ok(());
            }
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
        *self.mem.write() = mem;
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
