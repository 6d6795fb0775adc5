//! Xen blkif requests as a hostile frontend writes them: the input is cut into ring slots,
//! decoded in both ABIs, and each decoded request is executed by the engine against a MemDisk
//! with a simulated grant table (8 pages). Nothing may panic; every request gets a status.
#![no_main]

use std::sync::Arc;

use blktap::abi::Abi;
use blktap::engine::Engine;
use blktap::grant::SimGrantTable;
use blktap::shm::SharedMem;
use blockdev::MemDisk;
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;

fn engine() -> Engine<MemDisk, SimGrantTable> {
    let pages = Arc::new(SharedMem::anonymous(8 * PAGE).expect("shm"));
    Engine::new(MemDisk::new(256 << 10), SimGrantTable::new(pages).expect("grants"))
}

fuzz_target!(|data: &[u8]| {
    let engine = engine();
    for abi in [Abi::X86_64, Abi::X86_32] {
        let slot = abi.slot_size();
        // Short slices must be refused, not read past.
        let _ = blktap::request::decode(abi, &data[..data.len().min(slot - 1)]);
        for chunk in data.chunks(slot) {
            if let Some(req) = blktap::request::decode(abi, chunk) {
                let status = engine.handle(&req);
                assert!((-2..=0).contains(&status), "unexpected status {status}");
                assert_eq!(engine.grants().mapped(), 0, "grant mapping leaked");
            }
        }
    }
});
