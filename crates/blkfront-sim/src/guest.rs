//! A simulated guest's block frontend: turns reads, writes, flushes and discards into ring
//! requests over granted pages, with many requests in flight, the way Linux `blkfront` does.

use std::collections::HashMap;
use std::time::Duration;

use zerocopy::IntoBytes;

use crate::connect::SimFrontend;
use crate::{Error, Result};
use blktap::abi::{
    Abi, MAX_SEGMENTS, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER, PAGE_SIZE, SECTOR_SIZE,
    Segment,
};
use blktap::engine::SEGMENTS_PER_INDIRECT_PAGE;
use blktap::event::{EventChannel, Wake};
use blktap::request::{encode_discard, encode_indirect, encode_segments};

/// One operation of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp {
    /// Read `sectors` sectors from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
    },
    /// Write `data` (whole sectors) at `sector`; `barrier` sends it as `WRITE_BARRIER`.
    Write {
        /// First sector.
        sector: u64,
        /// The bytes, a multiple of 512.
        data: Vec<u8>,
        /// Ordered against every other request, and durable.
        barrier: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Drop `sectors` sectors from `sector` (they read back as zeros from Parallax).
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The request id returned by [`Guest::submit`].
    pub id: u64,
    /// The operation as submitted (write data is dropped).
    pub op: GuestOp,
    /// `BLKIF_RSP_*`.
    pub status: i16,
    /// For a successful read: the bytes read.
    pub data: Option<Vec<u8>>,
}

struct Pending {
    op: GuestOp,
    /// The `operation` the response must carry.
    response_op: u8,
    pages: Vec<u32>,
    first_byte: usize,
}

/// A frontend with a pool of grant pages and requests in flight.
pub struct Guest {
    front: SimFrontend,
    free_pages: Vec<u32>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    unpublished: bool,
}

/// Sectors one request can carry with `segments` segments, at most.
pub fn max_request_sectors(segments: usize) -> u32 {
    // A transfer that does not start on a page boundary needs one page more.
    ((segments - 1) * PAGE_SIZE / SECTOR_SIZE) as u32
}

impl Guest {
    /// A guest over an attached frontend; its data pages are the grant pool.
    pub fn new(front: SimFrontend) -> Self {
        let pages = front.memory.len() / PAGE_SIZE;
        let free_pages = (front.first_data_gref..pages as u32).rev().collect();
        Self { front, free_pages, pending: HashMap::new(), next_id: 1, unpublished: false }
    }

    /// Disk size in sectors.
    pub fn sectors(&self) -> u64 {
        self.front.disk.sectors
    }

    /// The backend says the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.front.disk.read_only
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Largest read or write one request may carry, in sectors.
    pub fn max_sectors(&self) -> u32 {
        let indirect = self.front.disk.max_indirect_segments as usize;
        max_request_sectors(indirect.max(MAX_SEGMENTS))
    }

    fn pages_needed(op: &GuestOp) -> usize {
        match op {
            GuestOp::Read { sector, sectors } => Self::span(*sector, u64::from(*sectors)),
            GuestOp::Write { sector, data, .. } => Self::span(*sector, (data.len() / SECTOR_SIZE) as u64),
            GuestOp::Flush | GuestOp::Discard { .. } => 0,
        }
    }

    fn span(sector: u64, sectors: u64) -> usize {
        let first = (sector % 8) as usize * SECTOR_SIZE;
        (first + sectors as usize * SECTOR_SIZE).div_ceil(PAGE_SIZE)
    }

    /// True if `op` can be submitted now (a ring slot and enough grant pages are free).
    pub fn can_submit(&self, op: &GuestOp) -> bool {
        let pages = Self::pages_needed(op);
        let indirect = usize::from(pages > MAX_SEGMENTS);
        self.front.ring.free_requests() > 0 && self.free_pages.len() >= pages + indirect
    }

    /// Puts `op` on the ring (unpublished until [`Guest::push`]) and returns its id.
    pub fn submit(&mut self, op: GuestOp) -> Result<u64> {
        if !self.can_submit(&op) {
            return Err(Error::Protocol("no free ring slot or grant page".into()));
        }
        let abi = self.front.ring.abi();
        let id = self.next_id;
        let mut pages = Vec::new();
        let mut first_byte = 0;
        let built = self.build(abi, id, &op, &mut pages, &mut first_byte);
        let bytes = match built.and_then(|b| self.front.ring.put_request(&b).map(|()| b)) {
            Ok(b) => b,
            Err(e) => {
                // Nothing was published: the pages go back to the pool.
                self.free_pages.extend(pages);
                return Err(e);
            }
        };
        self.next_id += 1;
        self.unpublished = true;
        let response_op = match (bytes[0], &op) {
            (OP_INDIRECT, GuestOp::Read { .. }) => OP_READ,
            (OP_INDIRECT, _) => OP_WRITE,
            (code, _) => code,
        };
        let op = match op {
            GuestOp::Write { sector, data, barrier } => {
                GuestOp::Write { sector, data: Vec::with_capacity(data.len()), barrier }
            }
            other => other,
        };
        self.pending.insert(id, Pending { op, response_op, pages, first_byte });
        Ok(id)
    }

    /// The request bytes of `op`, taking and filling grant pages.
    fn build(
        &mut self,
        abi: Abi,
        id: u64,
        op: &GuestOp,
        pages: &mut Vec<u32>,
        first_byte: &mut usize,
    ) -> Result<Vec<u8>> {
        Ok(match op {
            GuestOp::Flush => encode_segments(abi, OP_FLUSH_DISKCACHE, id, 0, &[]),
            GuestOp::Discard { sector, sectors } => encode_discard(abi, id, *sector, *sectors),
            GuestOp::Read { sector, sectors } => {
                *first_byte = (sector % 8) as usize * SECTOR_SIZE;
                let segs = self.grant(*sector, *sectors as usize * SECTOR_SIZE, pages, None)?;
                self.rw_request(abi, OP_READ, id, *sector, &segs, pages)?
            }
            GuestOp::Write { sector, data, barrier } => {
                if data.is_empty() || !data.len().is_multiple_of(SECTOR_SIZE) {
                    return Err(Error::Protocol("write of a partial sector".into()));
                }
                *first_byte = (sector % 8) as usize * SECTOR_SIZE;
                let segs = self.grant(*sector, data.len(), pages, Some(data))?;
                let opcode = if *barrier { OP_WRITE_BARRIER } else { OP_WRITE };
                self.rw_request(abi, opcode, id, *sector, &segs, pages)?
            }
        })
    }

    /// Takes grant pages for a transfer of `len` bytes starting at `sector`, copying `data` in.
    fn grant(&mut self, sector: u64, len: usize, pages: &mut Vec<u32>, data: Option<&Vec<u8>>) -> Result<Vec<Segment>> {
        let mut segs = Vec::new();
        let mut offset = (sector % 8) as usize * SECTOR_SIZE;
        let mut done = 0;
        while done < len {
            let gref = self.free_pages.pop().ok_or_else(|| Error::Protocol("out of grant pages".into()))?;
            pages.push(gref);
            let n = (PAGE_SIZE - offset).min(len - done);
            if let Some(d) = data {
                self.front.memory.write(gref as usize * PAGE_SIZE + offset, &d[done..done + n])?;
            }
            segs.push(Segment {
                gref,
                first_sect: (offset / SECTOR_SIZE) as u8,
                last_sect: ((offset + n) / SECTOR_SIZE - 1) as u8,
                pad: 0,
            });
            done += n;
            offset = 0;
        }
        Ok(segs)
    }

    fn rw_request(
        &mut self,
        abi: Abi,
        op: u8,
        id: u64,
        sector: u64,
        segs: &[Segment],
        pages: &mut Vec<u32>,
    ) -> Result<Vec<u8>> {
        if segs.len() <= MAX_SEGMENTS {
            return Ok(encode_segments(abi, op, id, sector, segs));
        }
        if op == OP_WRITE_BARRIER || segs.len() > SEGMENTS_PER_INDIRECT_PAGE {
            return Err(Error::Protocol("request too large".into()));
        }
        let gref = self.free_pages.pop().ok_or_else(|| Error::Protocol("out of grant pages".into()))?;
        pages.push(gref);
        self.front.memory.write(gref as usize * PAGE_SIZE, segs.as_bytes())?;
        Ok(encode_indirect(abi, op, id, sector, segs.len() as u16, gref))
    }

    /// Publishes submitted requests and notifies the backend if it asked.
    pub fn push(&mut self) -> Result<()> {
        if self.unpublished {
            self.unpublished = false;
            if self.front.ring.push_requests_and_check_notify()? {
                self.front.events.notify()?;
            }
        }
        Ok(())
    }

    /// Publishes, then collects finished operations, waiting up to `timeout` for at least one
    /// if none is ready.
    pub fn complete(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        self.push()?;
        let mut out = Vec::new();
        loop {
            while let Some((id, operation, status)) = self.front.ring.take_response()? {
                out.push(self.finish(id, operation, status)?);
            }
            if !out.is_empty() || self.pending.is_empty() {
                return Ok(out);
            }
            if self.front.ring.final_check_for_responses()? {
                continue;
            }
            match self.front.events.wait(timeout)? {
                Wake::Notified => {}
                Wake::TimedOut => {
                    if self.front.ring.final_check_for_responses()? {
                        continue;
                    }
                    return Err(Error::Protocol(format!(
                        "no response within {timeout:?} with {} requests in flight",
                        self.pending.len()
                    )));
                }
                Wake::Closed => return Err(Error::PeerGone),
            }
        }
    }

    fn finish(&mut self, id: u64, operation: u8, status: i16) -> Result<Completion> {
        let p = self.pending.remove(&id).ok_or_else(|| Error::Protocol(format!("response for unknown id {id}")))?;
        if operation != p.response_op {
            // Linux blkfront treats this as a broken backend and disables the disk.
            return Err(Error::Protocol(format!(
                "response to request {id} has operation {operation}, expected {}",
                p.response_op
            )));
        }
        let data = match (&p.op, status) {
            (GuestOp::Read { sectors, .. }, 0) => {
                let len = *sectors as usize * SECTOR_SIZE;
                let mut buf = vec![0u8; len];
                let mut offset = p.first_byte;
                let mut done = 0;
                for &gref in &p.pages {
                    if done == len {
                        break;
                    }
                    let n = (PAGE_SIZE - offset).min(len - done);
                    self.front.memory.read(gref as usize * PAGE_SIZE + offset, &mut buf[done..done + n])?;
                    done += n;
                    offset = 0;
                }
                Some(buf)
            }
            _ => None,
        };
        self.free_pages.extend(p.pages);
        Ok(Completion { id, op: p.op, status, data })
    }

    /// Submits one operation and waits for it (no other request may be in flight).
    pub fn run(&mut self, op: GuestOp, timeout: Duration) -> Result<Completion> {
        let id = self.submit(op)?;
        loop {
            for c in self.complete(timeout)? {
                if c.id == id {
                    return Ok(c);
                }
            }
        }
    }
}
