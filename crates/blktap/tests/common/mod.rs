//! Helpers shared by the integration tests: a ring, grant pages and an engine in one process.
#![allow(dead_code)]

use std::sync::Arc;

use blkfront_sim::front::FrontRing;
use blktap::abi::{Abi, PAGE_SIZE, Segment};
use blktap::engine::Engine;
use blktap::grant::SimGrantTable;
use blktap::request::{encode_discard, encode_segments};
use blktap::ring::BackRing;
use blktap::shm::SharedMem;
use blockdev::MemDisk;

pub struct Rig {
    pub front: FrontRing,
    pub back: BackRing,
    pub engine: Engine<MemDisk, SimGrantTable>,
    pub pages: Arc<SharedMem>,
    pub abi: Abi,
}

pub fn rig(abi: Abi, start: u32, grant_pages: usize, disk: u64) -> Rig {
    let ring = Arc::new(SharedMem::anonymous(PAGE_SIZE).unwrap());
    let pages = Arc::new(SharedMem::anonymous(grant_pages * PAGE_SIZE).unwrap());
    let front = FrontRing::init_at(ring.clone(), abi, start).unwrap();
    let back = BackRing::attach_at(ring, abi, start).unwrap();
    let engine = Engine::new(MemDisk::new(disk), SimGrantTable::new(pages.clone()).unwrap());
    Rig { front, back, engine, pages, abi }
}

/// Bytes of a segment request in `abi`, claiming `nr` segments (which may disagree with
/// `segs`, to build malformed requests).
pub fn rw_bytes(abi: Abi, op: u8, id: u64, sector: u64, nr: u8, segs: &[Segment]) -> Vec<u8> {
    let mut bytes = encode_segments(abi, op, id, sector, &segs[..segs.len().min(11)]);
    bytes[1] = nr; // nr_segments follows the operation byte in both ABIs
    bytes
}

/// Bytes of a native discard request.
pub fn discard_bytes(id: u64, sector: u64, nr_sectors: u64) -> Vec<u8> {
    encode_discard(Abi::X86_64, id, sector, nr_sectors)
}

pub fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment { gref, first_sect: first, last_sect: last, pad: 0 }
}

/// Pushes requests, serves until idle, returns all responses.
pub fn run(rig: &mut Rig, reqs: &[Vec<u8>]) -> Vec<(u64, u8, i16)> {
    for r in reqs {
        rig.front.put_request(r).unwrap();
    }
    rig.front.push_requests_and_check_notify().unwrap();
    loop {
        let s = rig.engine.serve(&mut rig.back).unwrap();
        if !s.more {
            break;
        }
    }
    let mut out = Vec::new();
    while let Some(r) = rig.front.take_response().unwrap() {
        out.push(r);
    }
    out
}
