//! A host-side vhost-user-blk driver for benchmarks: it connects to a vhost-user-blk socket as a
//! VMM would (shared memory from a file in /dev/shm, one split virtqueue, kick and call
//! eventfds) and keeps a fixed number of 4 KiB or larger requests in flight, so a server's
//! request path is measured without a guest's emulated CPU in the way.
//!
//! Only what a benchmark needs is negotiated: VERSION_1 and the protocol features (rings are
//! enabled explicitly), no event indexes, no indirect descriptors, one queue.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const F_VERSION_1: u64 = 1 << 32;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

/// Descriptors in the queue (three per request).
const QUEUE_SIZE: u16 = 256;
/// Guest-physical layout of the shared memory.
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Headers and status bytes, 64 bytes per request slot.
const HEADERS: u64 = 0x4000;
/// Data buffers, one per slot.
const DATA: u64 = 0x10_0000;

/// What to keep in flight.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Writes (OUT) or reads (IN).
    pub write: bool,
    /// Bytes per request (a multiple of 512).
    pub block: u32,
    /// Random offsets (else sequential, wrapping).
    pub random: bool,
    /// Requests in flight.
    pub depth: u16,
    /// How long to run.
    pub time: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Requests completed.
    pub requests: u64,
    /// Wall time from the first submission to the last completion.
    pub elapsed: Duration,
}

impl Outcome {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One connection to a vhost-user-blk server, with queue 0 set up.
pub struct Client {
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    _backing: tempfile::NamedTempFile,
    kick: EventFd,
    call: EventFd,
    /// Readiness of `call`.
    epoll: Epoll,
    /// The disk's size in bytes.
    disk: u64,
    max_block: u32,
    max_depth: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Client {
    /// Connects to `socket`, a server of a disk of `disk` bytes, with room for requests of up
    /// to `max_block` bytes at up to `max_depth` in flight.
    pub fn connect(socket: &Path, disk: u64, max_block: u32, max_depth: u16) -> Result<Client> {
        ensure!(3 * u32::from(max_depth) <= u32::from(QUEUE_SIZE), "depth {max_depth} too large");
        let size = DATA + u64::from(max_depth) * u64::from(max_block);
        let backing = tempfile::Builder::new().prefix("vhost-client-").tempfile_in("/dev/shm").context("shm file")?;
        backing.as_file().set_len(size).context("shm size")?;
        let file: File = backing.reopen().context("shm reopen")?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(size)?,
            Some(FileOffset::new(file, 0)),
        )])
        .context("mapping the shared memory")?;
        let region = mem.find_region(GuestAddress(0)).context("no region")?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).context("region info")?;
        let user = region.as_ptr() as u64;

        let mut fe = Frontend::connect(socket, 1).with_context(|| format!("connecting to {}", socket.display()))?;
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        ensure!(offered & F_VERSION_1 != 0 && offered & protocol != 0, "server features {offered:#x}");
        let pf = fe.get_protocol_features().context("GET_PROTOCOL_FEATURES")?;
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG).context("SET_PROTOCOL_FEATURES")?;
        fe.set_features(F_VERSION_1 | protocol).context("SET_FEATURES")?;
        fe.set_mem_table(&[info]).context("SET_MEM_TABLE")?;
        fe.set_vring_num(0, QUEUE_SIZE).context("SET_VRING_NUM")?;
        fe.set_vring_base(0, 0).context("SET_VRING_BASE")?;
        let rings = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: user + DESC,
            used_ring_addr: user + USED,
            avail_ring_addr: user + AVAIL,
            log_addr: None,
        };
        fe.set_vring_addr(0, &rings).context("SET_VRING_ADDR")?;
        let (kick, call) = (EventFd::new(0).context("eventfd")?, EventFd::new(0).context("eventfd")?);
        fe.set_vring_call(0, &call).context("SET_VRING_CALL")?;
        fe.set_vring_kick(0, &kick).context("SET_VRING_KICK")?;
        fe.set_vring_enable(0, true).context("SET_VRING_ENABLE")?;
        // Without REPLY_ACK nothing above is acknowledged, and the server handles these messages
        // on one thread and kicks on another: a kick that overtook SET_VRING_ENABLE would be
        // consumed while the ring is still disabled, and lost. A request with a reply, handled
        // after the others in order, closes that window.
        fe.get_features().context("GET_FEATURES (sync)")?;

        let epoll = Epoll::new().context("epoll")?;
        epoll.ctl(ControlOperation::Add, call.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).context("epoll")?;
        let c = Client {
            epoll,
            _frontend: fe,
            mem,
            _backing: backing,
            kick,
            call,
            disk,
            max_block,
            max_depth,
            avail_idx: 0,
            used_seen: 0,
        };
        // Each slot's chain is fixed: header, data, status.
        for slot in 0..max_depth {
            let head = 3 * slot;
            let (header, data) = (HEADERS + 64 * u64::from(slot), DATA + u64::from(slot) * u64::from(max_block));
            c.descriptor(head, header, 16, D_NEXT, head + 1)?;
            c.descriptor(head + 1, data, max_block, D_NEXT, head + 2)?;
            c.descriptor(head + 2, header + 16, 1, D_WRITE, 0)?;
        }
        Ok(c)
    }

    fn descriptor(&self, at: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(at)))?;
        Ok(())
    }

    /// Puts slot `slot`'s request (type, sector, length) on the available ring, unpublished.
    fn prepare(&mut self, slot: u16, w: &Workload, offset: u64) -> Result<()> {
        let head = 3 * slot;
        let header = HEADERS + 64 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(if w.write { T_OUT } else { T_IN }).to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header))?;
        self.mem.write_obj(0xffu8, GuestAddress(header + 16))?;
        ensure!(w.block <= self.max_block && slot < self.max_depth, "request larger than the client's room");
        let data = DATA + u64::from(slot) * u64::from(self.max_block);
        let flags = if w.write { D_NEXT } else { D_NEXT | D_WRITE };
        self.descriptor(head + 1, data, w.block, flags, head + 2)?;
        let at = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head.to_le(), GuestAddress(at))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes the prepared requests and kicks the server.
    fn publish(&self) -> Result<()> {
        self.mem.store(self.avail_idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release)?;
        self.kick.write(1).context("kick")?;
        Ok(())
    }

    /// Waits for the server's call, then returns the slots of every request completed since
    /// the last time; fails on a request whose status is not OK.
    fn completions(&mut self) -> Result<Vec<u16>> {
        loop {
            let used: u16 = u16::from_le(self.mem.load(GuestAddress(USED + 2), Ordering::Acquire)?);
            if used != self.used_seen {
                let mut slots = Vec::new();
                while self.used_seen != used {
                    let at = USED + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
                    let id = u32::from_le(self.mem.read_obj(GuestAddress(at))?);
                    let slot = u16::try_from(id / 3).context("used id")?;
                    let status: u8 = self.mem.read_obj(GuestAddress(HEADERS + 64 * u64::from(slot) + 16))?;
                    ensure!(status == 0, "request in slot {slot} failed with status {status}");
                    slots.push(slot);
                    self.used_seen = self.used_seen.wrapping_add(1);
                }
                return Ok(slots);
            }
            // Servers may set O_NONBLOCK on the call eventfd they were given (it is the same
            // open file for both ends), so wait for it to be readable before reading it.
            self.wait_call()?;
        }
    }

    fn wait_call(&self) -> Result<()> {
        let mut ready = [EpollEvent::default()];
        self.epoll.wait(-1, &mut ready).context("waiting for the server's call")?;
        match self.call.read() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e).context("reading the server's call"),
        }
    }

    /// Reads `len` bytes at `offset` (one request, slot 0) and returns them.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let w = Workload { write: false, block: len, random: false, depth: 1, time: Duration::ZERO };
        self.prepare(0, &w, offset)?;
        self.publish()?;
        let slots = self.completions()?;
        ensure!(slots == [0], "unexpected completions {slots:?}");
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(DATA))?;
        Ok(data)
    }

    /// Runs `w`: keeps `w.depth` requests in flight for `w.time`, then waits for the last.
    pub fn run(&mut self, w: &Workload, seed: u64) -> Result<Outcome> {
        let blocks = self.disk / u64::from(w.block);
        ensure!(blocks > 0, "disk smaller than one request");
        let mut rng = seed | 1;
        let mut next_seq = 0u64;
        let mut offset = || {
            let b = if w.random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            } else {
                next_seq = (next_seq + 1) % blocks;
                next_seq
            };
            b * u64::from(w.block)
        };
        let start = Instant::now();
        for slot in 0..w.depth {
            self.prepare(slot, w, offset())?;
        }
        self.publish()?;
        let (mut done, mut in_flight) = (0u64, u64::from(w.depth));
        while in_flight > 0 {
            let slots = self.completions()?;
            in_flight -= slots.len() as u64;
            done += slots.len() as u64;
            if start.elapsed() < w.time {
                for &slot in &slots {
                    self.prepare(slot, w, offset())?;
                    in_flight += 1;
                }
                if !slots.is_empty() {
                    self.publish()?;
                }
            }
        }
        if done == 0 {
            bail!("no request completed");
        }
        Ok(Outcome { requests: done, elapsed: start.elapsed() })
    }
}
