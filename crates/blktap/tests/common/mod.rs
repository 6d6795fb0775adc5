//! Helpers shared by the integration tests: a ring, grant pages and an engine in one process.
#![allow(dead_code)]

use std::sync::Arc;

use blktap::abi::{Abi, DiscardRequest, PAGE_SIZE, Request, Segment, X86_32Request};
use blktap::engine::Engine;
use blktap::front::FrontRing;
use blktap::grant::SimGrantTable;
use blktap::ring::BackRing;
use blktap::shm::SharedMem;
use blockdev::MemDisk;
use zerocopy::IntoBytes;

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

/// Bytes of a segment request in `abi`.
pub fn rw_bytes(abi: Abi, op: u8, id: u64, sector: u64, nr: u8, segs: &[Segment]) -> Vec<u8> {
    let mut seg = [Segment::default(); 11];
    for (d, s) in seg.iter_mut().zip(segs) {
        *d = *s;
    }
    match abi {
        Abi::X86_64 => Request { operation: op, nr_segments: nr, id, sector_number: sector, seg, ..Default::default() }
            .as_bytes()
            .to_vec(),
        Abi::X86_32 => X86_32Request { operation: op, nr_segments: nr, handle: 0, id, sector_number: sector, seg }
            .as_bytes()
            .to_vec(),
    }
}

/// Bytes of a native discard request.
pub fn discard_bytes(id: u64, sector: u64, nr_sectors: u64) -> Vec<u8> {
    DiscardRequest { operation: blktap::abi::OP_DISCARD, id, sector_number: sector, nr_sectors, ..Default::default() }
        .as_bytes()
        .to_vec()
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
