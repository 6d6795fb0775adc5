//! Damaged store images: bytes laid over a small, freshly written store (at a fuzz-chosen
//! offset), or the input as the whole image. Opening, loading the registry, reading every VDI
//! and checking the store may fail, but must not panic, hang or allocate without bound.
#![no_main]

use std::sync::{Arc, OnceLock};

use blockdev::BlockDevice;
use blockstore::{BlockStore, CreateOptions, MemBackend, OpenOptions};
use libfuzzer_sys::fuzz_target;
use vdi::Registry;

const BLOCK: usize = 4096;

fn open_options() -> OpenOptions {
    OpenOptions { cache_blocks: 64, ..OpenOptions::default() }
}

/// A store with a 16-block journal, two VDIs, written blocks, a snapshot and a clone.
fn template() -> &'static Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let mem = MemBackend::new();
        let store = BlockStore::create(
            Arc::new(mem.clone()),
            &CreateOptions { journal_slot_blocks: 16, max_blocks: 0 },
            &open_options(),
        )
        .expect("create");
        let reg = Registry::open(Arc::new(store)).expect("registry");
        let id = reg.create_vdi("golden", Some(1 << 20)).expect("vdi");
        let disk = reg.open_vdi(id, true).expect("open");
        for i in 0..8u64 {
            disk.write_at(i * 3 * BLOCK as u64, &[i as u8 + 1; BLOCK], false).expect("write");
        }
        drop(disk);
        let snap = reg.snapshot(id).expect("snap");
        let clone = reg.clone_snapshot("clone", snap).expect("clone");
        reg.open_vdi(clone, true).expect("open").write_at(0, &[0xAB; BLOCK], false).expect("write");
        reg.store().commit().expect("commit");
        drop(reg);
        mem.durable_image()
    })
}

fn exercise(mem: MemBackend) {
    let Ok(store) = BlockStore::open(Arc::new(mem), &open_options()) else { return };
    let Ok(reg) = Registry::open(Arc::new(store)) else { return };
    let mut buf = vec![0u8; BLOCK];
    for v in reg.list() {
        if let Ok(d) = reg.open_vdi(v.id, false) {
            for i in 0..8u64 {
                let _ = d.read_at(i * 3 * BLOCK as u64, &mut buf);
            }
        }
    }
    let _ = reg.check(false);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = MemBackend::new();
    if data[0] == 0xFF {
        // The input is the whole image (tiny: truncated stores, bad superblocks).
        mem.corrupt(0, &data[1..]);
    } else {
        let t = template();
        let blocks = t.len() / BLOCK;
        let block = usize::from(u16::from_le_bytes([data[0], data[1]])) % blocks;
        let within = usize::from(u16::from_le_bytes([data[2], data[3]])) % BLOCK;
        mem.corrupt(0, t);
        let patch = &data[4..];
        let at = block * BLOCK + within;
        let end = (at + patch.len()).min(t.len());
        mem.corrupt(at as u64, &patch[..end - at]);
    }
    exercise(mem);
});
