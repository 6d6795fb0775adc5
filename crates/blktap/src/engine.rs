//! Validation and dispatch of ring requests to a [`BlockDevice`].
//!
//! Requests are served one at a time in ring order, so a WRITE_BARRIER trivially waits for
//! every earlier request, and later requests wait for it. Every malformed request gets an
//! `RSP_ERROR` (or `RSP_EOPNOTSUPP`) response and no side effect; nothing from the guest can make
//! the engine panic or touch memory outside the granted pages.

use blockdev::{BlockDevice, DevError, check_range};
use zerocopy::FromBytes;

use crate::Result;
use crate::abi::{
    MAX_INDIRECT_PAGES, MAX_SEGMENTS, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER,
    PAGE_SIZE, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY, SECTOR_SIZE, SECTORS_PER_PAGE, Segment,
};
use crate::grant::{GrantPiece, GrantTable};
use crate::request::{BlkRequest, Body};
use crate::ring::BackRing;

/// Segments per indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / size_of::<Segment>();
/// Most segments accepted in one indirect request (the value to advertise in
/// `feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
const _: () = assert!(MAX_INDIRECT_SEGMENTS <= MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE);

/// What one call of [`Engine::serve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Served {
    /// Requests answered.
    pub handled: u32,
    /// The guest asked to be notified of the published responses.
    pub notify: bool,
    /// More requests are waiting: call [`Engine::serve`] again before sleeping.
    pub more: bool,
}

/// What to do with a request once it has been executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answer it with this `BLKIF_RSP_*` status.
    Respond(i16),
    /// Do not answer: stop serving the ring and fail the device ([`crate::Error::FlushFailed`]).
    FailDevice(String),
}

/// Serves blkif requests from a ring against a block device through a grant table.
#[derive(Debug)]
pub struct Engine<D, G> {
    dev: D,
    grants: G,
}

/// A validated transfer: byte offset on the disk and the page pieces, in order.
struct Plan {
    offset: u64,
    len: usize,
    pieces: Vec<GrantPiece>,
}

fn status_of(e: &DevError) -> i16 {
    match e {
        DevError::Unsupported(_) => RSP_EOPNOTSUPP,
        _ => RSP_ERROR,
    }
}

impl<D: BlockDevice, G: GrantTable> Engine<D, G> {
    /// An engine serving `dev` through `grants`.
    pub fn new(dev: D, grants: G) -> Self {
        Self { dev, grants }
    }

    /// The device served.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The grant table used.
    pub fn grants(&self) -> &G {
        &self.grants
    }

    /// Answers the requests waiting on `ring` (at most one ring's worth), publishes the
    /// responses and re-arms `req_event` if the ring is empty. Errors only if the ring is broken.
    pub fn serve(&self, ring: &mut BackRing) -> Result<Served> {
        let mut handled = 0;
        while handled < ring.size() {
            let Some(req) = ring.next_request()? else { break };
            let status = match self.execute(&req) {
                Verdict::Respond(status) => status,
                Verdict::FailDevice(why) => {
                    // The answers already given still reach the guest.
                    if handled > 0 {
                        ring.push_responses_and_check_notify()?;
                    }
                    return Err(crate::Error::FlushFailed(why));
                }
            };
            ring.put_response(req.id, req.response_operation(), status)?;
            handled += 1;
        }
        let notify = handled > 0 && ring.push_responses_and_check_notify()?;
        let more = ring.final_check_for_requests()?;
        Ok(Served { handled, notify, more })
    }

    /// Executes one request and says whether to answer it ([`Engine::handle`]), or to fail the
    /// device instead because a flush failed.
    pub fn execute(&self, req: &BlkRequest) -> Verdict {
        match (req.operation, req.body) {
            // blkfront takes an error on any flush or barrier as "unsupported" and never
            // flushes again (on an empty one Linux says so outright), so a failed flush is not
            // answered: the device is failed. A retry could not be trusted either, as a failed
            // fsync may already have dropped the unwritten pages.
            (OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER, Body::Segments { nr_segments, sector_number, seg }) => {
                match self.flush(nr_segments as usize, sector_number, &seg) {
                    Ok(status) => Verdict::Respond(status),
                    Err(e) => Verdict::FailDevice(e.to_string()),
                }
            }
            _ => Verdict::Respond(self.handle(req)),
        }
    }

    /// A flush or barrier of `n` segments: the status to answer, or the error of the flush
    /// itself. It may carry write data (Linux sends preflush/FUA writes so): flush first, then
    /// write the data durably.
    fn flush(&self, n: usize, sector_number: u64, seg: &[Segment]) -> std::result::Result<i16, DevError> {
        if n > MAX_SEGMENTS {
            return Ok(RSP_ERROR);
        }
        if n == 0 {
            // An empty flush: Linux blkfront leaves `sector_number` as the block layer's
            // (sector_t)-1, so it is ignored; a read-only disk has nothing to flush.
            if self.dev.read_only() {
                return Ok(RSP_OKAY);
            }
            return self.dev.flush().map(|()| RSP_OKAY);
        }
        let plan = match self.plan(true, sector_number, &seg[..n]) {
            Ok(p) => p,
            Err(s) => return Ok(s),
        };
        self.dev.flush()?;
        Ok(self.move_data(true, true, &plan))
    }

    /// Executes one request and returns its `BLKIF_RSP_*` status. A failed flush is answered
    /// with an error here; servers use [`Engine::execute`], which fails the device.
    pub fn handle(&self, req: &BlkRequest) -> i16 {
        match (req.operation, req.body) {
            (OP_READ | OP_WRITE, Body::Segments { nr_segments, sector_number, seg }) => {
                let n = nr_segments as usize;
                if n == 0 || n > MAX_SEGMENTS {
                    return RSP_ERROR;
                }
                self.transfer(req.operation == OP_WRITE, false, sector_number, &seg[..n])
            }
            (OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER, Body::Segments { nr_segments, sector_number, seg }) => {
                self.flush(nr_segments as usize, sector_number, &seg).unwrap_or_else(|e| status_of(&e))
            }
            (OP_DISCARD, Body::Discard { sector_number, nr_sectors, .. }) => self.discard(sector_number, nr_sectors),
            (OP_INDIRECT, Body::Indirect { indirect_op, nr_segments, sector_number, indirect_grefs }) => {
                self.indirect(indirect_op, nr_segments as usize, sector_number, &indirect_grefs)
            }
            _ => RSP_EOPNOTSUPP,
        }
    }

    /// Validates a transfer without side effects.
    fn plan(&self, write: bool, sector_number: u64, segs: &[Segment]) -> std::result::Result<Plan, i16> {
        if write && self.dev.read_only() {
            return Err(RSP_ERROR);
        }
        let mut pieces = Vec::with_capacity(segs.len());
        let mut len = 0usize;
        for s in segs {
            if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
                return Err(RSP_ERROR);
            }
            let start = s.first_sect as usize * SECTOR_SIZE;
            let bytes = (s.last_sect - s.first_sect + 1) as usize * SECTOR_SIZE;
            pieces.push(GrantPiece { gref: s.gref, offset: start, len: bytes });
            len += bytes;
        }
        let offset = sector_number.checked_mul(SECTOR_SIZE as u64).ok_or(RSP_ERROR)?;
        check_range(offset, len as u64, self.dev.size()).map_err(|_| RSP_ERROR)?;
        Ok(Plan { offset, len, pieces })
    }

    fn transfer(&self, write: bool, fua: bool, sector_number: u64, segs: &[Segment]) -> i16 {
        match self.plan(write, sector_number, segs) {
            Ok(plan) => self.move_data(write, fua, &plan),
            Err(s) => s,
        }
    }

    /// Moves the data between the guest's pages and the disk.
    fn move_data(&self, write: bool, fua: bool, plan: &Plan) -> i16 {
        let mut buf = vec![0u8; plan.len];
        if write {
            if self.grants.copy_from_guest(&plan.pieces, &mut buf).is_err() {
                return RSP_ERROR;
            }
            match self.dev.write_at(plan.offset, &buf, fua) {
                Ok(()) => RSP_OKAY,
                Err(e) => status_of(&e),
            }
        } else {
            match self.dev.read_at(plan.offset, &mut buf) {
                Ok(()) if self.grants.copy_to_guest(&plan.pieces, &buf).is_ok() => RSP_OKAY,
                Ok(()) => RSP_ERROR,
                Err(e) => status_of(&e),
            }
        }
    }

    fn discard(&self, sector_number: u64, nr_sectors: u64) -> i16 {
        if self.dev.read_only() {
            return RSP_ERROR;
        }
        let (Some(offset), Some(len)) =
            (sector_number.checked_mul(SECTOR_SIZE as u64), nr_sectors.checked_mul(SECTOR_SIZE as u64))
        else {
            return RSP_ERROR;
        };
        if check_range(offset, len, self.dev.size()).is_err() {
            return RSP_ERROR;
        }
        if len == 0 {
            return RSP_OKAY;
        }
        match self.dev.discard(offset, len) {
            Ok(()) => RSP_OKAY,
            Err(e) => status_of(&e),
        }
    }

    /// An indirect READ/WRITE: copies the segment array out of the indirect pages, then
    /// validates and executes it like a direct request.
    fn indirect(&self, op: u8, n: usize, sector_number: u64, grefs: &[u32; MAX_INDIRECT_PAGES]) -> i16 {
        if !matches!(op, OP_READ | OP_WRITE) {
            return RSP_EOPNOTSUPP;
        }
        if n == 0 || n > MAX_INDIRECT_SEGMENTS {
            return RSP_ERROR;
        }
        let mut segs = Vec::with_capacity(n);
        let mut left = n;
        for &gref in grefs.iter().take(n.div_ceil(SEGMENTS_PER_INDIRECT_PAGE)) {
            let count = left.min(SEGMENTS_PER_INDIRECT_PAGE);
            let mut raw = vec![0u8; count * size_of::<Segment>()];
            let piece = GrantPiece { gref, offset: 0, len: raw.len() };
            if self.grants.copy_from_guest(&[piece], &mut raw).is_err() {
                return RSP_ERROR;
            }
            for chunk in raw.chunks_exact(size_of::<Segment>()) {
                match Segment::read_from_bytes(chunk) {
                    Ok(s) => segs.push(s),
                    Err(_) => return RSP_ERROR,
                }
            }
            left -= count;
        }
        self.transfer(op == OP_WRITE, false, sector_number, &segs)
    }
}
