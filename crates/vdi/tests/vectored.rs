//! Vectored reads and writes (a guest's scattered buffers, served by vhost-user-blk without a
//! bounce copy) give the bytes a plain read or write of the same run gives: across block edges,
//! over holes, private blocks and blocks shared with a snapshot, on a store in a file (one
//! `preadv`/`pwritev` per run of blocks) and in memory.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{Backend, FileBackend, MemBackend};

const SIZE: u64 = 1 << 20;

/// Splits `len` bytes into buffers of awkward lengths (none a multiple of 512 but the last).
fn lengths(len: usize, seed: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let (mut left, mut k) = (len, seed);
    while left > 0 {
        k = (k * 7919 + 13) % 9001;
        let n = (1 + k).min(left);
        out.push(n);
        left -= n;
    }
    out
}

fn write_vectored(dev: &dyn BlockDevice, offset: u64, data: &[u8], seed: usize) {
    let mut at = 0;
    let parts: Vec<&[u8]> = lengths(data.len(), seed)
        .into_iter()
        .map(|n| {
            at += n;
            &data[at - n..at]
        })
        .collect();
    let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    dev.write_vectored_at(offset, &bufs, false).expect("vectored write");
}

fn read_vectored(dev: &dyn BlockDevice, offset: u64, len: usize, seed: usize) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = lengths(len, seed).into_iter().map(|n| vec![0xeeu8; n]).collect();
    let mut bufs: Vec<IoSliceMut<'_>> = parts.iter_mut().map(|p| IoSliceMut::new(p)).collect();
    dev.read_vectored_at(offset, &mut bufs).expect("vectored read");
    parts.concat()
}

#[test]
fn vectored_reads_and_writes_match_plain_ones_on_every_kind_of_block() {
    // A file (preadv/pwritev) and memory (the backends' default: one buffer of their own).
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(FileBackend::open(&dir.path().join("store"), true, true).expect("store file"));
    vectored_matches_plain(file);
    vectored_matches_plain(Arc::new(MemBackend::new()));
}

fn vectored_matches_plain(backend: Arc<dyn Backend>) {
    let reg = common::new_store(backend);
    let id = reg.create_vdi("vm", Some(SIZE)).unwrap();
    let dev = reg.open_vdi(id, true).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let pattern = |seed: u8, n: usize| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect() };

    // Into holes (new blocks, partial edges), then over the private blocks it made.
    let (off, data) = (3 * 4096 + 700, pattern(1, 40_000));
    write_vectored(&dev, off, &data, 1);
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    let (off, data) = (5 * 4096 + 100, pattern(2, 9_000));
    write_vectored(&dev, off, &data, 2);
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);

    // After a snapshot every block is shared: copy-on-write with partial blocks merged.
    let sid = reg.snapshot(id).unwrap();
    let before = model.clone();
    let (off, data) = (4096 - 10, pattern(3, 30_000));
    write_vectored(&dev, off, &data, 3);
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);

    for (seed, (off, len)) in [(0, 50_000)].into_iter().chain([(3 * 4096 + 1, 61_000), (4096 * 200, 8192)]).enumerate()
    {
        let got = read_vectored(&dev, off, len, seed + 5);
        assert!(got == model[off as usize..off as usize + len], "vectored read at {off}+{len} differs");
        let mut plain = vec![0u8; len];
        dev.read_at(off, &mut plain).unwrap();
        assert!(plain == got, "plain read at {off}+{len} differs from the vectored one");
    }
    let snap = reg.open_snapshot(sid).unwrap();
    assert!(read_vectored(&snap, 0, 80_000, 9) == before[..80_000], "the snapshot changed");

    // Past the end: refused whole, nothing written.
    let (a, b) = ([1u8; 512], [2u8; 1024]);
    assert!(dev.write_vectored_at(SIZE - 1024, &[IoSlice::new(&a), IoSlice::new(&b)], false).is_err());
    assert!(read_vectored(&dev, SIZE - 1536, 1536, 1) == model[SIZE as usize - 1536..]);
    drop((dev, snap));
    common::assert_clean(&reg);
}
