//! The backend half of a blkif shared ring (ring.h's `BACK_RING_*` and `RING_*` macros).
//!
//! Requests are copied out of shared memory before anything looks at them; the producer index
//! written by the guest is validated each time it is read, and a ring whose producer index
//! claims more outstanding requests than the ring holds is reported broken for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use crate::abi::{
    Abi, PAGE_SIZE, REQ_EVENT_OFFSET, REQ_PROD_OFFSET, RING_OFFSET, RSP_EVENT_OFFSET, RSP_PROD_OFFSET, ring_entries,
};
use crate::request::{BlkRequest, decode, encode_response};
use crate::shm::SharedMem;
use crate::{Error, Result};

/// Number of slots of a ring region of `len` bytes, or an error if `len` is not a positive
/// multiple of the page size or holds no slot.
pub fn ring_size_for(len: usize, abi: Abi) -> Result<u32> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(Error::BadRegionSize(len));
    }
    match ring_entries(len / PAGE_SIZE, abi.slot_size()) {
        0 => Err(Error::BadRegionSize(len)),
        n => Ok(n),
    }
}

/// Byte offset of the slot for ring index `idx` in a ring of `size` (a power of two) slots.
pub fn slot_offset(idx: u32, size: u32, abi: Abi) -> usize {
    RING_OFFSET + (idx & (size - 1)) as usize * abi.slot_size()
}

/// The backend's view of a shared ring: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing {
    mem: Arc<SharedMem>,
    abi: Abi,
    size: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
    rsp_prod_published: u32,
    broken: Option<(u32, u32)>,
}

impl BackRing {
    /// Attaches to a ring the frontend has initialised (indices start at 0).
    pub fn new(mem: Arc<SharedMem>, abi: Abi) -> Result<Self> {
        Self::attach_at(mem, abi, 0)
    }

    /// Attaches to a ring whose consumer and producer indices are both `index` (resuming a
    /// ring after a backend restart with nothing outstanding).
    pub fn attach_at(mem: Arc<SharedMem>, abi: Abi, index: u32) -> Result<Self> {
        let size = ring_size_for(mem.len(), abi)?;
        Ok(Self { mem, abi, size, req_cons: index, rsp_prod_pvt: index, rsp_prod_published: index, broken: None })
    }

    /// Continues a ring a previous backend served, for a backend restarted under a connected
    /// frontend: consumer and producer start at the response index the ring shows published,
    /// which must be `detached_at`, where the previous backend detached cleanly.
    ///
    /// Only a clean detach makes this right: the previous backend answered every request it
    /// had taken and flushed the disk. After a crash, requests taken but not answered cannot
    /// be found again (their slots may already hold other responses), running a stale slot
    /// again could repeat a write the guest has since overwritten, and writes acknowledged
    /// but not flushed may have been lost without the guest ever learning of it. So there is
    /// no resuming without `detached_at`.
    pub fn resume(mem: Arc<SharedMem>, abi: Abi, detached_at: u32) -> Result<Self> {
        let size = ring_size_for(mem.len(), abi)?;
        let req_prod = mem.atomic_u32(REQ_PROD_OFFSET)?.load(Ordering::Acquire);
        let rsp_prod = mem.atomic_u32(RSP_PROD_OFFSET)?.load(Ordering::Acquire);
        if req_prod.wrapping_sub(rsp_prod) > size {
            return Err(Error::BrokenRing { req_prod, rsp_prod, size });
        }
        if rsp_prod != detached_at {
            return Err(Error::Refused(format!(
                "the ring's published responses ({rsp_prod}) are not where the previous backend detached ({detached_at})"
            )));
        }
        Self::attach_at(mem, abi, rsp_prod)
    }

    /// Requests the frontend has published beyond our responses (`req_prod - rsp_prod`).
    pub fn waiting(&self) -> Result<u32> {
        let req_prod = self.word(REQ_PROD_OFFSET)?.load(Ordering::Acquire);
        Ok(req_prod.wrapping_sub(self.rsp_prod_pvt))
    }

    /// This ring's memory, continued with [`BackRing::resume`].
    pub fn resumed(self, detached_at: u32) -> Result<Self> {
        Self::resume(self.mem, self.abi, detached_at)
    }

    /// The published response index, if every request taken was answered and published (the
    /// state in which a later backend may [`BackRing::resume`] the ring).
    pub fn quiescent_at(&self) -> Option<u32> {
        (self.req_cons == self.rsp_prod_pvt && self.rsp_prod_pvt == self.rsp_prod_published)
            .then_some(self.rsp_prod_published)
    }

    /// Number of slots in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The guest ABI of the slots.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Index of the next request to consume.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Index of the next response to produce.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    fn word(&self, offset: usize) -> Result<&AtomicU32> {
        self.mem.atomic_u32(offset)
    }

    fn broken_error(&self, req_prod: u32) -> Error {
        Error::BrokenRing { req_prod, rsp_prod: self.rsp_prod_pvt, size: self.size }
    }

    /// Number of requests ready to consume (`RING_HAS_UNCONSUMED_REQUESTS`), after checking the
    /// guest's `req_prod` (`RING_REQUEST_PROD_OVERFLOW`, and never behind our consumer).
    pub fn unconsumed_requests(&mut self) -> Result<u32> {
        if let Some((req_prod, _)) = self.broken {
            return Err(self.broken_error(req_prod));
        }
        let req_prod = self.word(REQ_PROD_OFFSET)?.load(Ordering::Acquire);
        let since_rsp = req_prod.wrapping_sub(self.rsp_prod_pvt);
        let ready = req_prod.wrapping_sub(self.req_cons);
        if since_rsp > self.size || ready > since_rsp {
            self.broken = Some((req_prod, self.rsp_prod_pvt));
            return Err(self.broken_error(req_prod));
        }
        let room = self.size - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(ready.min(room))
    }

    /// Copies the next request out of the ring and decodes it, or `None` if there is none.
    pub fn next_request(&mut self) -> Result<Option<BlkRequest>> {
        if self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let mut slot = vec![0u8; self.abi.slot_size()];
        self.mem.read(slot_offset(self.req_cons, self.size, self.abi), &mut slot)?;
        self.req_cons = self.req_cons.wrapping_add(1);
        // The slot is exactly one ABI slot long, so decoding cannot fail; treat it as broken
        // rather than panic if that ever changes.
        decode(self.abi, &slot).map(Some).ok_or(Error::BadRegionSize(slot.len()))
    }

    /// Writes a response into the next response slot (not yet visible to the guest).
    pub fn put_response(&mut self, id: u64, operation: u8, status: i16) -> Result<()> {
        if self.rsp_prod_pvt == self.req_cons {
            return Err(Error::NoOutstandingRequest);
        }
        let bytes = encode_response(self.abi, id, operation, status);
        self.mem.write(slot_offset(self.rsp_prod_pvt, self.size, self.abi), &bytes)?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the responses written so far and says whether the guest asked to be notified
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses_and_check_notify(&mut self) -> Result<bool> {
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        self.word(RSP_PROD_OFFSET)?.store(new, Ordering::Release);
        self.rsp_prod_published = new;
        fence(Ordering::SeqCst);
        let rsp_event = self.word(RSP_EVENT_OFFSET)?.load(Ordering::Acquire);
        Ok(new.wrapping_sub(rsp_event) < new.wrapping_sub(old))
    }

    /// Before sleeping: asks to be notified of the next request and says whether requests
    /// arrived meanwhile (`RING_FINAL_CHECK_FOR_REQUESTS`).
    pub fn final_check_for_requests(&mut self) -> Result<bool> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.word(REQ_EVENT_OFFSET)?.store(self.req_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }
}
