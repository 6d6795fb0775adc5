//! A simulated frontend half of the ring (ring.h's `FRONT_RING_*` macros), standing in for a
//! guest's `blkfront` in tests and in the cross-process example.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use crate::{Error, Result};
use blktap::abi::{Abi, REQ_EVENT_OFFSET, REQ_PROD_OFFSET, RING_OFFSET, RSP_EVENT_OFFSET, RSP_PROD_OFFSET};
use blktap::request::decode_response;
use blktap::ring::{ring_size_for, slot_offset};
use blktap::shm::SharedMem;

/// The frontend's view of a shared ring: produces requests, consumes responses.
#[derive(Debug)]
pub struct FrontRing {
    mem: Arc<SharedMem>,
    abi: Abi,
    size: u32,
    req_prod_pvt: u32,
    req_prod_published: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// Initialises the shared ring (`SHARED_RING_INIT`) and attaches to it.
    pub fn init(mem: Arc<SharedMem>, abi: Abi) -> Result<Self> {
        Self::init_at(mem, abi, 0)
    }

    /// Initialises the shared ring with all indices at `index` (to exercise wrap-around).
    pub fn init_at(mem: Arc<SharedMem>, abi: Abi, index: u32) -> Result<Self> {
        let size = ring_size_for(mem.len(), abi)?;
        mem.write(0, &[0u8; RING_OFFSET])?;
        mem.atomic_u32(REQ_PROD_OFFSET)?.store(index, Ordering::Relaxed);
        mem.atomic_u32(RSP_PROD_OFFSET)?.store(index, Ordering::Relaxed);
        mem.atomic_u32(REQ_EVENT_OFFSET)?.store(index.wrapping_add(1), Ordering::Relaxed);
        mem.atomic_u32(RSP_EVENT_OFFSET)?.store(index.wrapping_add(1), Ordering::Release);
        Ok(Self { mem, abi, size, req_prod_pvt: index, req_prod_published: index, rsp_cons: index })
    }

    /// Attaches to a ring another process initialised with [`FrontRing::init`].
    pub fn attach(mem: Arc<SharedMem>, abi: Abi) -> Result<Self> {
        let size = ring_size_for(mem.len(), abi)?;
        let idx = mem.atomic_u32(REQ_PROD_OFFSET)?.load(Ordering::Acquire);
        Ok(Self { mem, abi, size, req_prod_pvt: idx, req_prod_published: idx, rsp_cons: idx })
    }

    /// Number of slots in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The guest ABI of the slots.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    fn word(&self, offset: usize) -> Result<&AtomicU32> {
        self.mem.atomic_u32(offset)
    }

    /// Slots free for new requests (`RING_FREE_REQUESTS`).
    pub fn free_requests(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Writes one request (its bytes in the ring's ABI) into the next slot, unpublished.
    pub fn put_request(&mut self, bytes: &[u8]) -> Result<()> {
        if self.free_requests() == 0 || bytes.len() > self.abi.slot_size() {
            return Err(Error::Protocol("ring full or request too large".into()));
        }
        self.mem.write(slot_offset(self.req_prod_pvt, self.size, self.abi), bytes)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the requests written so far; true if the backend asked to be notified
    /// (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    pub fn push_requests_and_check_notify(&mut self) -> Result<bool> {
        let old = self.req_prod_published;
        let new = self.req_prod_pvt;
        self.word(REQ_PROD_OFFSET)?.store(new, Ordering::Release);
        self.req_prod_published = new;
        fence(Ordering::SeqCst);
        let event = self.word(REQ_EVENT_OFFSET)?.load(Ordering::Acquire);
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// Stores a raw value into the shared `req_prod` (to simulate a hostile guest).
    pub fn set_req_prod_raw(&self, value: u32) -> Result<()> {
        self.word(REQ_PROD_OFFSET)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Takes the next published response `(id, operation, status)`, if any.
    pub fn take_response(&mut self) -> Result<Option<(u64, u8, i16)>> {
        let rsp_prod = self.word(RSP_PROD_OFFSET)?.load(Ordering::Acquire);
        let ready = rsp_prod.wrapping_sub(self.rsp_cons);
        if ready > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(Error::Protocol(format!("rsp_prod {rsp_prod} beyond requests")));
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut slot = vec![0u8; self.abi.slot_size()];
        self.mem.read(slot_offset(self.rsp_cons, self.size, self.abi), &mut slot)?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        decode_response(self.abi, &slot).map(Some).ok_or_else(|| Error::Protocol("short response slot".into()))
    }

    /// Before sleeping: asks to be notified of the next response; true if responses arrived
    /// meanwhile (`RING_FINAL_CHECK_FOR_RESPONSES`).
    pub fn final_check_for_responses(&mut self) -> Result<bool> {
        let pending = |s: &Self| -> Result<bool> { Ok(s.word(RSP_PROD_OFFSET)?.load(Ordering::Acquire) != s.rsp_cons) };
        if pending(self)? {
            return Ok(true);
        }
        self.word(RSP_EVENT_OFFSET)?.store(self.rsp_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        pending(self)
    }
}
