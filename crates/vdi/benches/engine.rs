//! Engine benchmarks: snapshot cost against the number of existing snapshots, 4 KiB writes to
//! private and to shared blocks, and import throughput beside a plain file copy.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use blockdev::BlockDevice;
use blockstore::{Backend, BlockStore, CreateOptions, FileBackend, MemBackend, OpenOptions};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vdi::{Registry, VdiId};

const GIB: u64 = 1 << 30;

fn mem_registry() -> Arc<Registry> {
    let store = BlockStore::create(Arc::new(MemBackend::new()), &CreateOptions::default(), &OpenOptions::default())
        .expect("store");
    Registry::open(Arc::new(store)).expect("registry")
}

fn file_registry(dir: &std::path::Path) -> Arc<Registry> {
    let path = dir.join("bench.dat");
    let _ = std::fs::remove_file(&path);
    let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&path, true, true).expect("file"));
    let store = BlockStore::create(backend, &CreateOptions::default(), &OpenOptions::default()).expect("store");
    Registry::open(Arc::new(store)).expect("registry")
}

/// A VDI with 64 MiB of data, so snapshots have real trees under them.
fn populated(reg: &Arc<Registry>) -> VdiId {
    let id = reg.create_vdi("bench", Some(16 * GIB)).expect("create");
    let dev = reg.open_vdi(id, true).expect("open");
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..64u64 {
        dev.write_at(i * (1 << 20) * 37 % (16 * GIB), &chunk, false).expect("write");
    }
    dev.flush().expect("flush");
    id
}

fn snapshots(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(50);
    for existing in [1u64, 1_000, 100_000] {
        let reg = mem_registry();
        let id = populated(&reg);
        for _ in 0..existing {
            reg.snapshot(id).expect("setup snapshot");
        }
        g.bench_function(format!("in-memory store, {existing} existing"), |b| {
            b.iter(|| black_box(reg.snapshot(id).expect("snapshot")))
        });
    }
    let dir =
        tempfile::tempdir_in(std::env::var_os("PARALLAX_BENCH_DIR").unwrap_or_else(|| ".".into())).expect("tempdir");
    let reg = file_registry(dir.path());
    let id = populated(&reg);
    g.bench_function("file store with fsync, 1 existing", |b| {
        b.iter(|| black_box(reg.snapshot(id).expect("snapshot")))
    });
    g.finish();
}

fn writes(c: &mut Criterion) {
    let dir =
        tempfile::tempdir_in(std::env::var_os("PARALLAX_BENCH_DIR").unwrap_or_else(|| ".".into())).expect("tempdir");
    let reg = file_registry(dir.path());
    let id = populated(&reg);
    let dev = reg.open_vdi(id, true).expect("open");
    let block = vec![0xa5u8; 4096];
    let mut g = c.benchmark_group("write 4 KiB");
    g.throughput(Throughput::Bytes(4096));
    dev.write_at(0, &block, false).expect("first write");
    g.bench_function("private block (in place)", |b| {
        b.iter(|| dev.write_at(0, black_box(&block), false).expect("write"))
    });
    // Each iteration writes a block that a fresh snapshot shares: the copy-on-write path.
    let mut n = 0u64;
    g.bench_function("shared block (copy on write)", |b| {
        b.iter_batched(
            || {
                n = (n + 1) % 16_384;
                if n == 0 {
                    reg.snapshot(id).expect("snapshot");
                }
                (n * 4096) % (64 << 20)
            },
            |off| dev.write_at(off, black_box(&block), false).expect("write"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn import(c: &mut Criterion) {
    let dir =
        tempfile::tempdir_in(std::env::var_os("PARALLAX_BENCH_DIR").unwrap_or_else(|| ".".into())).expect("tempdir");
    let image = dir.path().join("image.raw");
    let size = 256u64 << 20;
    {
        let mut f = std::fs::File::create(&image).expect("image");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            for w in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).expect("write image");
        }
        f.sync_all().expect("sync");
    }
    let mut g = c.benchmark_group("import 256 MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size));
    g.bench_function("vdi fill", |b| {
        b.iter_batched(
            || {
                let reg = file_registry(dir.path());
                let id = reg.create_vdi("img", None).expect("create");
                (reg, id)
            },
            |(reg, id)| {
                reg.fill(id, &image, &mut |_, _| {}).expect("fill");
            },
            BatchSize::PerIteration,
        )
    });
    let copy = dir.path().join("copy.raw");
    // Both sides end durable: fill commits (one sync), the copy is synced too.
    g.bench_function("std::fs::copy + fsync (plain file copy)", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&copy);
            std::fs::copy(&image, &copy).expect("copy");
            std::fs::File::open(&copy).and_then(|f| f.sync_all()).expect("sync");
        })
    });
    g.finish();
}

criterion_group!(benches, snapshots, writes, import);
criterion_main!(benches);
