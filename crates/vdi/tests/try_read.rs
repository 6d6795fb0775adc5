//! Reads that must not wait (`BlockDevice::try_read_at`, what an NBD connection's reader tries
//! before handing a READ to a worker): when they answer, they give the bytes and the allocation
//! a plain read and `extents` give; when a tree block is not in memory, or a data block is not
//! in the page cache, they decline instead of reading the medium.

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, TryRead};
use blockstore::{Backend, BlockStore, FileBackend, MemBackend, OpenOptions};
use vdi::Registry;

const SIZE: u64 = 1 << 20;

/// (offset, length) pairs: aligned and not, inside a block, across edges, over holes.
const READS: &[(u64, usize)] = &[
    (0, 4096),
    (512, 512),
    (4096 - 100, 300),
    (8192, 65536),
    (3 * 4096 + 17, 20_000),
    (40 * 4096, 4096),
    (SIZE - 4096, 4096),
    (SIZE - 700, 700),
    (100 * 4096 + 1, 1),
];

/// Writes a pattern with holes between its runs, some partial blocks.
fn write_pattern(dev: &dyn BlockDevice, byte: u8) {
    for (i, &(offset, len)) in
        [(4096u64, 4096usize), (5 * 4096 + 512, 6000), (16 * 4096, 32768), (SIZE - 2048, 1024)].iter().enumerate()
    {
        dev.write_at(offset, &vec![byte.wrapping_add(i as u8); len], false).expect("write");
    }
}

/// Checks every read of [`READS`] against a plain read and `extents`; returns how many
/// answered without waiting.
fn compare(dev: &dyn BlockDevice, what: &str) -> usize {
    let mut answered = 0;
    for &(offset, len) in READS {
        let mut want = vec![0u8; len];
        dev.read_at(offset, &mut want).expect("plain read");
        let mut got = vec![0xeeu8; len];
        match dev.try_read_at(offset, &mut got).expect("try_read_at") {
            TryRead::Done(extents) => {
                answered += 1;
                assert!(got == want, "{what}: bytes of {offset}+{len} differ from a plain read");
                let plain = dev.extents(offset, len as u64).expect("extents");
                assert_eq!(extents, plain, "{what}: allocation of {offset}+{len}");
            }
            TryRead::WouldWait => {}
        }
    }
    answered
}

/// A directory on the file system of the build (not `/tmp`, which may be tmpfs: its pages
/// cannot be dropped, and these tests need a page cache that can).
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir under the target dir")
}

fn store_on(backend: Arc<dyn Backend>, cache_blocks: usize) -> Arc<Registry> {
    let open = OpenOptions { cache_blocks, ..common::open_options() };
    let store = BlockStore::create(backend, &common::create_options(), &open).expect("create");
    Registry::open(Arc::new(store)).expect("registry")
}

#[test]
fn reads_that_do_not_wait_give_what_plain_reads_give() {
    let dir = scratch_dir();
    let file: Arc<dyn Backend> = Arc::new(FileBackend::open(&dir.path().join("store"), true, true).unwrap());
    for (backend, what) in [(file, "file"), (Arc::new(MemBackend::new()) as Arc<dyn Backend>, "memory")] {
        let reg = store_on(backend, 4096);
        let id = reg.create_vdi("vm", Some(SIZE)).unwrap();
        let vdi = reg.open_vdi(id, true).unwrap();
        write_pattern(&vdi, 1);
        let sid = reg.snapshot(id).unwrap();
        // Copies on write over part of what the snapshot shares.
        vdi.write_at(4096 + 1000, &[0x77; 100], false).unwrap();
        vdi.write_at(16 * 4096, &[0x66; 4096], false).unwrap();
        let snap = reg.open_snapshot(sid).unwrap();
        // Everything was just written: in memory, or in the page cache of the file.
        // (A file system without RWF_NOWAIT for buffered reads answers none: reads on the
        // NBD reader would then never happen, which is worth a failure.)
        assert_eq!(compare(&vdi, &format!("VDI on {what}")), READS.len(), "every read answered ({what})");
        assert_eq!(compare(&snap, &format!("snapshot on {what}")), READS.len(), "every read answered ({what})");
        // A read past the end is an error, as for a plain read.
        let mut buf = [0u8; 512];
        assert!(vdi.try_read_at(SIZE - 256, &mut buf).is_err());
    }
}

#[test]
fn a_read_whose_tree_block_is_not_in_memory_declines() {
    // 64 MiB: 32 leaves, each holding one written block.
    const BIG: u64 = 64 << 20;
    let backend = Arc::new(MemBackend::new());
    let leaves = BIG / (512 * 4096);
    {
        let reg = store_on(backend.clone(), 4096);
        let id = reg.create_vdi("vm", Some(BIG)).unwrap();
        let vdi = reg.open_vdi(id, true).unwrap();
        for leaf in 0..leaves {
            vdi.write_at(leaf * 512 * 4096, &[(leaf as u8).wrapping_add(1); 4096], false).unwrap();
        }
        vdi.flush().unwrap();
    }
    // Opened again: no leaf is in memory.
    let reg = common::reopen(backend);
    let vdi = reg.open_vdi(reg.list()[0].id, false).unwrap();
    for leaf in 0..leaves {
        let (offset, want) = (leaf * 512 * 4096, vec![(leaf as u8).wrapping_add(1); 4096]);
        let mut buf = vec![0u8; 4096];
        assert_eq!(vdi.try_read_at(offset, &mut buf).unwrap(), TryRead::WouldWait, "leaf {leaf}, not yet read");
        // The plain read fetches the leaf; right after, it is in memory.
        vdi.read_at(offset, &mut buf).unwrap();
        assert_eq!(buf, want, "leaf {leaf}");
        buf.fill(0);
        let again = vdi.try_read_at(offset, &mut buf).unwrap();
        assert!(matches!(again, TryRead::Done(_)), "leaf {leaf} once read");
        assert_eq!(buf, want, "leaf {leaf}");
    }
}

#[test]
fn a_read_whose_data_is_not_in_the_page_cache_declines() {
    let dir = scratch_dir();
    let path = dir.path().join("store");
    let file = Arc::new(FileBackend::open(&path, true, true).unwrap());
    let reg = store_on(file.clone(), 4096);
    let id = reg.create_vdi("vm", Some(SIZE)).unwrap();
    let vdi = reg.open_vdi(id, true).unwrap();
    vdi.write_at(0, &[9u8; 65536], false).unwrap();
    // Durable, so its pages are clean and the kernel may drop them; then drop them.
    vdi.flush().unwrap();
    let mut buf = vec![0u8; 65536];
    // `POSIX_FADV_DONTNEED` is advice: a page some other kernel path holds at that moment
    // (compaction or reclaim moving it, a per-CPU batch) stays cached, and a read of it may
    // then answer. So the advice is given again, a bounded number of times; a read that
    // waits for the medium instead of declining answers every time and fails here.
    const ATTEMPTS: usize = 50;
    let declined = (0..ATTEMPTS).any(|_| {
        rustix::fs::fadvise(file.file(), 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        vdi.try_read_at(0, &mut buf).unwrap() == TryRead::WouldWait
    });
    assert!(
        declined,
        "data the page cache no longer holds must be left to a thread that may wait \
         (answered after each of {ATTEMPTS} drops of the page cache)"
    );
    vdi.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 65536]);
    assert!(matches!(vdi.try_read_at(0, &mut buf).unwrap(), TryRead::Done(_)), "once read, it is cached");
    assert_eq!(buf, vec![9u8; 65536]);
}
